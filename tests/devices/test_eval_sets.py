"""`edgeft eval` on the built-in sets: builtin:facts for accuracy, builtin:mixed-genre for perplexity per genre,
read by the evaluator on tiny-llama (eager) and checked against perplexities computed here from the model itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgeft.config import TrainConfig, dump_yaml
from edgeft.data import facts
from edgeft.data.fetch import SourceUnavailable
from edgeft.devices import evaluate as ev
from edgeft.models import resolve_model
from edgeft.rundir import RunDir


def test_eval_reads_facts_and_mixed_genre_and_reports_perplexity_per_genre(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    try:
        data = ev.load_eval_data(["builtin:facts", "builtin:mixed-genre"], limit=7)
    except SourceUnavailable as e:
        pytest.skip(f"source not reachable: {e}")
    assert data.tasks == facts.generate("test")[:7] and data.mc == facts.multiple_choice("test")[:7]
    assert list(data.heldout_genres) == ["literature", "reference", "technical", "dialogue"]

    model_dir = resolve_model("tiny-llama")
    run = RunDir(tmp_path / "run")
    run.converted.mkdir(parents=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(run.converted)
    run.scheme.write_text(json.dumps({"plan": {"scheme": "int8-int4"}}))
    run.config_file.write_text(dump_yaml(TrainConfig(model="tiny-llama", qat="int8-int4")))
    # every variant is the float tiny-llama: the evaluator's path, on a model whose numbers are known here
    monkeypatch.setattr(ev, "_variant_sources", lambda run: {v: (model_dir, model_dir) for v in ev.VARIANTS})
    report = ev.evaluate_run(
        run.root, runtimes=["eager"], data=data, ppl_tokens=96, ppl_chunk=64, max_new_tokens=4, progress=False
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, n = {}, {}
    for g, text in data.heldout_genres.items():  # the reference: chunks of the genre's first 96 tokens, fresh context
        ids = tok(text, add_special_tokens=False)["input_ids"][:96]
        bos = tok("", add_special_tokens=True)["input_ids"]
        step = 64 - len(bos)
        nll[g], n[g] = 0.0, 0
        for i in range(0, len(ids), step):
            x = torch.tensor([bos + ids[i : i + step]])
            with torch.no_grad():
                out = model(input_ids=x, labels=x)
            nll[g] += float(out.loss) * (x.shape[1] - 1)
            n[g] += x.shape[1] - 1
    assert report["heldout_genre_tokens"] == n and report["heldout_tokens"] == sum(n.values())
    for r in report["results"]:
        for g in nll:
            assert r["perplexity_by_genre"][g] == pytest.approx(math.exp(nll[g] / n[g]), rel=1e-4)
        assert r["perplexity"] == pytest.approx(math.exp(sum(nll.values()) / sum(n.values())), rel=1e-4)
        assert r["n_tasks"] == r["n_mc"] == 7
    # identical variants: PTQ did not degrade, so no recovery to state, per genre too
    assert report["recovery_by_genre"] == {"eager": {g: None for g in nll}}
    md = (run.root / "eval" / "report.md").read_text()
    assert "builtin:facts test split" in md and "| variant | runtime | literature | reference |" in md
    assert report["eval_data"]["heldout"].startswith("builtin:mixed-genre")
