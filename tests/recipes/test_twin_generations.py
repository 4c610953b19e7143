"""The twin's own generations as the QAT run's extra data (--qat-corpus-source): they are the twin's (each new
token the twin's argmax under greedy decoding, checked by one teacher-forced forward, not by generating again),
deterministic given the seed, saved once in the run and reused on resume, mixed in the expected counts."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from edgeft.config import TrainConfig, resolve
from edgeft.data import IGNORE_INDEX
from edgeft.recipes.common import corpus_split
from edgeft.training.distill import corpus_count, generate_continuations, generation_prompts

# fp32 logits of the cached (left-padded, batched) generate path vs one plain forward differ by ~1e-6 here; a
# token counts as the argmax within this margin
ARGMAX_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    from edgeft.models import load_model, resolve_model

    model, tok = load_model(resolve_model("tiny-llama"))
    return model, tok


def _argmax_share(model, examples) -> float:
    """Share of the generated tokens that are the model's argmax (within ARGMAX_TOL) given what precedes them."""
    hits = total = 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logits = model(input_ids=ids).logits[0].float()
            for pos, lab in enumerate(ex["labels"]):
                if lab == IGNORE_INDEX or pos == 0:
                    continue
                row = logits[pos - 1]
                hits += int(row[lab] >= row.max() - ARGMAX_TOL)
                total += 1
    return hits / total


def test_generations_are_the_models_greedy_continuations_and_deterministic(tiny):
    model, tok = tiny
    train_ex = [{"input_ids": [1, 5, 6, 7, 8, 9], "labels": [-100, -100, -100, 7, 8, 9]}] * 3
    prompts = generation_prompts(tok, train_ex, 6, seed=3)
    assert prompts[0] == [1, 5, 6] and all(len(p) > 0 for p in prompts)  # alternately data and prose openings
    assert any(p != [1, 5, 6] for p in prompts)
    state = torch.random.get_rng_state()
    greedy = generate_continuations(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.0, seed=0, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    assert len(greedy) == 6
    for p, ex in zip(prompts, greedy):
        assert ex["input_ids"][: len(p)] == p and ex["labels"][: len(p)] == [IGNORE_INDEX] * len(p)
        assert 1 <= len(ex["input_ids"]) - len(p) <= 12
    assert _argmax_share(model, greedy) == 1.0
    # batching (left padding) does not change them
    one = generate_continuations(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 0.0, seed=0, batch_size=1)
    assert one == greedy
    # sampling: the same seed, the same draws; another seed, others
    a = generate_continuations(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 1.0, seed=5, batch_size=4)
    b = generate_continuations(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 1.0, seed=5, batch_size=4)
    c = generate_continuations(model, prompts, tok.pad_token_id, tok.eos_token_id, 12, 1.0, seed=6, batch_size=4)
    assert a == b and a != c and a != greedy


def test_corpus_split_counts():
    n = corpus_count(12, 0.5)
    assert n == 12
    base = dict(model="tiny-llama", qat="int8-int4", qat_corpus=0.5)
    assert corpus_split(resolve(TrainConfig(**base)), 12) == (12, 0)
    assert corpus_split(resolve(TrainConfig(**base, qat_corpus_source="generations")), 12) == (0, 12)
    assert corpus_split(resolve(TrainConfig(**base, qat_corpus_source="mixed")), 12) == (6, 6)
    assert corpus_split(resolve(TrainConfig(**{**base, "qat_corpus": 0.25}, qat_corpus_source="mixed")), 9) == (1, 2)
    cfg = resolve(TrainConfig(**base, qat_corpus_source="mixed"))
    assert (cfg.qat.gen_tokens, cfg.qat.gen_temperature) == (96, 1.0)  # filled only when generating
    assert resolve(TrainConfig(**base)).qat.gen_tokens is None


def _rows(n: int) -> list[dict[str, str]]:
    words = "red green blue amber violet cyan teal olive".split()
    return [
        {"instruction": f"Name colour number {i}.", "output": f"The colour is {words[i % len(words)]}."}
        for i in range(n)
    ]


def test_train_mixes_saves_and_resumes_the_twins_generations(tmp_path, caplog, monkeypatch):
    """Through `edgeft train` on tiny-llama: the experimental preset's schedule applies (learned scales, 3x the
    steps, one log line), the generations are the twin's, saved once and reused on resume."""
    from edgeft import cli
    from edgeft.models import load_model, load_trained, resolve_model
    from edgeft.recipes import common

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    out = tmp_path / "r"
    # a high lr so the twin's argmaxes differ from the pretrained model's (the control below)
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--qat", "phone-deployment-learned"]
    args += ["--qat-corpus-source", "mixed", "--qat-corpus", "0.5", "--qat-gen-temperature", "0"]
    args += ["--qat-gen-tokens", "16", "--max-steps", "2", "--batch-size", "4", "--lr", "3e-3"]
    args += ["--save-steps", "1", "--no-progress", "--threads", "1", "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="edgeft"):
        assert cli.main(args) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert (
        "QAT recipe of preset phone-deployment-learned: weight_scale learned, steps_ratio 3.0, max_steps 6 (3 x 2)"
        in lines
    )
    assert "QAT data: 12 examples + 6 chunks of generic prose + 6 twin generations (--qat-corpus 0.50, mixed)" in lines
    qat_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    twin_steps = [
        json.loads(x)["step"] for x in (out / "baseline" / "metrics.jsonl").read_text().splitlines() if "loss" in x
    ]
    assert max(qat_steps) == 6 and max(twin_steps) == 2
    assert (out / "model" / "qat_scales.safetensors").exists()  # learned scales, from the preset
    saved = json.loads((out / "twin_generations.json").read_text())
    gens = saved["examples"]
    assert saved["record"] == {"count": 6, "seed": 42, "max_new_tokens": 16, "temperature": 0.0} and len(gens) == 6
    twin, _ = load_trained(out / "baseline")
    assert _argmax_share(twin, gens) == 1.0  # the twin's greedy continuations
    pretrained, _ = load_model(resolve_model("tiny-llama"))
    assert _argmax_share(pretrained, gens) < 0.9  # the check tells models apart
    # resume an interrupted QAT run: the saved generations are read, never made again
    before = (out / "twin_generations.json").read_bytes()
    for d in ("model", "converted"):
        import shutil

        shutil.rmtree(out / d)
    monkeypatch.setattr(common, "_generate", lambda *a, **k: pytest.fail("generated again on resume"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgeft"):
        assert cli.main(["train", "--resume", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert (out / "twin_generations.json").read_bytes() == before
    assert (out / "converted" / "scheme.json").exists()
    assert any("6 twin generations" in r.getMessage() for r in caplog.records)
