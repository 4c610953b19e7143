"""``--logits last``: the deployment .pte returns the last position's logits only, and is the same model.

Real exports of the tiny models, each validated by the exporter itself. Independently of that validation: the
last-token program's logits equal the last row of the all-positions program's (float tolerance), every
decode step agrees, ExecuTorch's TextLLMRunner and ``edgeft run`` generate the same greedy tokens from both,
the evaluator refuses the last-token program in one line, and the CLI option reaches the exporter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeft import qat  # noqa: E402
from edgeft.cli import main  # noqa: E402
from edgeft.devices.executorch_runtime import FULL_LOGITS_METHOD, PteRuntime  # noqa: E402
from edgeft.devices.host_run import run_artifact  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402
from edgeft.rundir import RunDir  # noqa: E402

SEQ = 64
CHUNK = 16  # the qwen3 pair takes prompts in chunks: the last-token program's last chunk carries the answer
TEXT = "The committee met on Tuesday to discuss the budget, 42 items in all, and adjourned at noon."


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """tiny-llama (one prefill call) and tiny-qwen3 (chunked prefill), each exported in both modes to one dir."""
    out = tmp_path_factory.mktemp("pte-last")
    res: dict[str, dict] = {}
    for name, seq in (("tiny-llama", SEQ), ("tiny-qwen3", CHUNK)):
        d = out / name
        res[name] = {
            "all": pte.export(resolve_model(name), d, max_seq_len=seq, max_context_len=SEQ),
            "last": pte.export(resolve_model(name), d, max_seq_len=seq, max_context_len=SEQ, logits="last"),
        }
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_last_program_is_written_beside_and_validated(pair, name):
    full, last = pair[name]["all"], pair[name]["last"]
    assert Path(full["path"]).name == "model.pte" and Path(last["path"]).name == "model-last.pte"
    assert Path(full["path"]).parent == Path(last["path"]).parent and Path(full["path"]).is_file()
    assert (full["logits"], last["logits"]) == ("all", "last") and (full["name"], last["name"]) == ("pte", "pte-last")
    v = last["validation"]
    assert v["rel_err"] <= 1e-3 and v["max_gap"] == 0 and v["greedy_agreement"] == 1.0
    assert v["runner_match"] and v["runner_tokens"] > 0
    with PteRuntime(full["path"]) as a, PteRuntime(last["path"]) as b:
        assert a.full_logits and not b.full_logits
        assert (a.max_seq_len, a.max_context_len, a.vocab_size, a.eos_ids) == (
            b.max_seq_len,
            b.max_context_len,
            b.vocab_size,
            b.eos_ids,
        )
        # the raw program output: [1, n, vocab] against [1, 1, vocab]
        ids = torch.tensor([[1, 5, 9, 13]], dtype=torch.long)
        pos = torch.arange(4, dtype=torch.long)
        assert tuple(a._method.execute([ids, pos])[0].shape) == (1, 4, a.vocab_size)
        assert tuple(b._method.execute([ids, pos])[0].shape) == (1, 1, b.vocab_size)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_last_logits_equal_all_programs_last_row(pair, name):
    model, tok = load_model(resolve_model(name))
    eager = EagerRuntime(model)
    prompts = [tok(TEXT).input_ids, tok(TEXT + " " + TEXT).input_ids, tok("Hello").input_ids]
    assert len(prompts[1]) > CHUNK  # qwen3: chunked prefill
    with PteRuntime(pair[name]["all"]["path"]) as a, PteRuntime(pair[name]["last"]["path"]) as b:
        for ids in prompts:
            row = a.logits(ids)[-1]
            got = b.next_logits(ids)
            assert got.shape == row.shape and _rel(got, row) <= 1e-5
            assert _rel(got, eager.logits(ids)[-1]) <= 1e-3
        # decode through the KV cache: each one-token step of the last-token program is that position's row
        ids = prompts[0]
        k = 6
        steps = [b._step(ids[:k], 0)] + [b._step([t], k + i) for i, t in enumerate(ids[k:])]
        assert _rel(torch.cat(steps), a.logits(ids)[k - 1 :]) <= 1e-5
        stop = {tok.eos_token_id}
        want = a.generate(ids, 20, stop)
        assert b.generate(ids, 20, stop) == want == eager.generate(ids, 20, stop) and len(want) > 0


def test_text_llm_runner_same_greedy_tokens(pair):
    """ExecuTorch's runner (what the apps wrap) on both programs: the same pieces, and eager's greedy text."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    model, tok = load_model(resolve_model("tiny-llama"))
    ids = tok(TEXT).input_ids
    want = EagerRuntime(model).generate(ids, 12, {tok.eos_token_id})
    out = {}
    for mode in ("all", "last"):
        path = Path(pair["tiny-llama"][mode]["path"])
        pieces: list[str] = []
        runner = TextLLMRunner(str(path), str(path.parent / "tokenizer.json"))
        cfg = GenerationConfig(echo=False, max_new_tokens=len(want), temperature=0.0, num_bos=1)
        runner.generate(TEXT, cfg, token_callback=pieces.append)
        out[mode] = pieces
    assert out["last"] == out["all"] and "".join(out["last"]) == tok.decode(want)


def test_edgeft_run_same_text(pair):
    texts = []
    for mode in ("all", "last"):
        r = run_artifact(pair["tiny-llama"][mode]["path"], TEXT, max_new_tokens=8, chat=False)
        assert r["generated_tokens"] > 0
        texts.append(r["text"])
    assert texts[0] == texts[1]


def test_evaluator_refuses_last_token_program(pair):
    model, tok = load_model(resolve_model("tiny-llama"))
    ids = tok(TEXT).input_ids
    with PteRuntime(pair["tiny-llama"]["last"]["path"]) as b:
        for call in (lambda: b.logits(ids), lambda: b.continuation_logits(ids[:5], [ids[5:8]])):
            with pytest.raises(EdgeftError, match="last-token logits only") as e:
                call()
            assert "\n" not in str(e.value) and "--logits all" in str(e.value)


def test_metadata_that_misdescribes_the_program_is_caught(pair):
    """A last-token program read as a full-logits one must never have its one row spread over n positions."""
    with PteRuntime(pair["tiny-llama"]["last"]["path"]) as b:
        b.full_logits = True
        with pytest.raises(EdgeftError, match=r"returned logits of shape \(1, 1, "):
            b.logits([1, 5, 9, 13])


def test_mode_mismatch_is_refused_and_old_files_kept(pair, tmp_path, monkeypatch):
    """The all-positions program where a last-token one was asked for (and the reverse): refused by validation."""
    src = resolve_model("tiny-llama")
    out = Path(pair["tiny-llama"]["all"]["path"]).parent
    before = {p.name: _sha(p) for p in out.iterdir()}
    for asked, other in (("last", "all"), ("all", "last")):
        buf = Path(pair["tiny-llama"][other]["path"]).read_bytes()
        monkeypatch.setattr(pte, "_lower", lambda *a, b=buf, **k: b)
        with pytest.raises(EdgeftError, match=FULL_LOGITS_METHOD):
            pte.export(src, out, max_seq_len=SEQ, logits=asked)
    assert {p.name: _sha(p) for p in out.iterdir()} == before


def test_bad_options(tmp_path):
    src = resolve_model("tiny-llama")
    with pytest.raises(EdgeftError, match="logits must be one of all, last"):
        pte.export(src, tmp_path / "a", logits="first")
    with pytest.raises(EdgeftError, match="dynamic-shape"):
        pte.export(src, tmp_path / "b", max_seq_len=32, logits="last", dynamic_shape=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export_last_on_a_quantized_run(tmp_path, capsys):
    """`edgeft export pte --logits last` through pipeline.export: phone-deployment, validated, in the manifest;
    the evaluated model.pte is not written; --logits on another format is one error line."""
    run = tmp_path / "run"
    model, tok = load_model(resolve_model("tiny-llama"))
    cm, rec = qat.convert(model, "phone-deployment")
    qat.save_converted(cm, tok, rec, RunDir(run).converted)
    RunDir(run).config_file.write_text("model: tiny-llama\n")
    assert main(["export", "pte", "--run", str(run), "--max-seq-len", "64", "--logits", "last"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["logits"] == "last" and report["embedding"] == "int8 (embedding_byte)"
    assert report["validation"]["runner_match"]
    assert (run / "exports" / "model-last.pte").is_file() and not (run / "exports" / "model.pte").exists()
    assert json.loads((run / "exports" / "manifest.json").read_text())["pte-last"]["logits"] == "last"
    assert main(["export", "gguf", "--run", str(run), "--logits", "last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logits applies to pte exports only" in err[0]
