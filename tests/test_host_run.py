"""``edgeft run`` on a tiny .pte: the text ExecuTorch's runner streams equals eager PyTorch's greedy generation.

The reference is independent of the code under test: the float tiny-llama in transformers, greedy through
``model.generate``, stopped at the program's EOS ids, decoded by the HF tokenizer. No timing assertions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("executorch")

from edgeft.cli import main  # noqa: E402
from edgeft.devices.executorch_runtime import PteRuntime  # noqa: E402
from edgeft.devices.host_run import _token_loop, run_artifact  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

PROMPT = "The committee met on Tuesday to discuss"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "exports"
    pte.export(resolve_model("tiny-llama"), out, max_seq_len=64)  # float program: eager to ~1e-6
    return out / "model.pte"


@pytest.fixture(scope="module")
def eager():
    model, tok = load_model(resolve_model("tiny-llama"))
    return EagerRuntime(model), tok


def _reference(eager, pte_path: Path, text: str, max_new: int) -> tuple[list[int], str]:
    rt, tok = eager
    with PteRuntime(pte_path) as p:
        stop = set(p.eos_ids)
    ids = tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id
    if bos is not None and tok("a").input_ids[:1] == [bos] and not (tok.bos_token and text.startswith(tok.bos_token)):
        ids = [bos] + ids
    out = rt.generate(ids, max_new, stop)
    return out, tok.decode(out)


def _utf8_prefix(tok, ids: list[int]) -> int:
    """How many leading tokens decode to valid text on their own (what the runner's binding can pass on)."""
    n = 0
    while n < len(ids) and "\ufffd" not in tok.decode([ids[n]]):
        n += 1
    return n


def test_run_prints_eager_greedy_text_raw(exported, eager, capsys):
    _, tok = eager
    ref, _ = _reference(eager, exported, PROMPT, 12)
    n = _utf8_prefix(tok, ref)
    assert n >= 3, "the tiny model's greedy tokens should start with plain text"
    want = tok.decode(ref[:n])
    rc = main(["run", "--pte", str(exported), "--prompt", PROMPT, "--raw", "--max-new-tokens", str(n)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out == want + "\n"
    stats = cap.err.strip().splitlines()
    assert len(stats) == 1 and f"generated {n} tokens" in stats[0] and "decode" in stats[0]
    assert "tokens/s" in stats[0] and "time to first token" in stats[0]


def _chat(tok, message: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)


# the random tiny model answers some of these with plain-text tokens, others with raw bytes (partial characters)
MESSAGES = [
    "Tell me a story.",
    "Hello",
    "What day comes after Monday?",
    "Convert 3 km to m.",
    "What is 7 times 6?",
    "How are you?",
]


def _pick(eager, exported, plain: bool) -> tuple[str, list[int], str]:
    _, tok = eager
    for message in MESSAGES:
        ref, want = _reference(eager, exported, _chat(tok, message), 10)
        if (_utf8_prefix(tok, ref) >= 3) if plain else (_utf8_prefix(tok, ref) == 0):
            return message, ref, want
    pytest.skip("no message gives the kind of answer this test needs")


def test_run_applies_the_chat_template_by_default(exported, eager):
    _, tok = eager
    assert (exported.parent / "chat_template.jinja").exists()  # the exporter puts the run's template beside it
    message, ref, _ = _pick(eager, exported, plain=True)
    text = _chat(tok, message)
    n = _utf8_prefix(tok, ref)
    got = run_artifact(exported, message, max_new_tokens=n)
    assert got["chat"] is True and got["prompt_text"] == text
    assert got["engine"] == "TextLLMRunner"
    assert got["text"] == tok.decode(ref[:n])
    assert got["generated_tokens"] == min(n, len(ref))
    assert got["prompt_tokens"] == len(tok(text, add_special_tokens=False).input_ids) + got["num_bos"]


def test_tokens_that_are_not_utf8_alone_still_give_eager_text(exported, eager):
    """The tiny model answers this one with raw byte tokens, which the runner's binding cannot pass to Python."""
    message, ref, want = _pick(eager, exported, plain=False)
    streamed: list[str] = []
    got = run_artifact(exported, message, max_new_tokens=10, on_text=streamed.append)
    assert "token loop" in got["engine"]
    assert got["text"] == want and got["generated_tokens"] == len(ref)
    assert want.startswith("".join(streamed))


def test_token_loop_fallback_equals_eager(exported, eager):
    """The path taken when the runner's binding meets a token that is not UTF-8 on its own."""
    _, tok = eager
    ref, want = _reference(eager, exported, PROMPT, 10)
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    if tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]:
        ids = [tok.bos_token_id] + ids
    streamed: list[str] = []
    shown = tok.decode(ref[:2])  # as if the runner had streamed two tokens before failing
    got = _token_loop(exported, ids, tok, 10, 0.0, shown, streamed.append)
    assert got["text"] == want
    assert shown + "".join(streamed) == want


def test_bad_input_is_one_error_line(exported, tmp_path, capsys):
    missing = tmp_path / "nope.pte"
    fake = tmp_path / "fake.pte"
    fake.write_text("not a program")
    notpte = tmp_path / "model.bin"
    shutil.copyfile(exported, notpte)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(exported, alone / "model.pte")  # no tokenizer.json beside it
    for path, words in [
        (missing, "does not exist"),
        (fake, "not an ExecuTorch program"),
        (notpte, "not a .pte file"),
        (alone / "model.pte", "tokenizer.json"),
    ]:
        rc = main(["run", "--pte", str(path), "--prompt", "hi"])
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("edgeft: error: ") and words in lines[0], cap.err
        assert cap.out == ""


def test_run_artifact_reports_counts(exported):
    got = run_artifact(exported, PROMPT, max_new_tokens=1, chat=False)
    assert got["generated_tokens"] <= 1 and got["prompt_tokens"] > 0
    assert got["decode_tokens"] == 0 and got["decode_tokens_per_s"] is None
    json.dumps({k: v for k, v in got.items()})  # plain data


def test_run_gguf_prints_eager_greedy_text(eager, tmp_path, capsys):
    """--gguf: the same command through llama.cpp; an f32 GGUF of the float model generates eager's tokens."""
    pytest.importorskip("llama_cpp")
    from edgeft.exporters import gguf

    path = tmp_path / "model-f32.gguf"
    gguf.export(resolve_model("tiny-llama"), path, quant="f32")
    rt, tok = eager
    ids = tok(PROMPT).input_ids  # llama.cpp adds BOS as the HF tokenizer does
    ref = rt.generate(ids, 8, {tok.eos_token_id} if tok.eos_token_id is not None else set())
    n = _utf8_prefix(tok, ref)
    assert n >= 3
    rc = main(["run", "--gguf", str(path), "--prompt", PROMPT, "--raw", "--max-new-tokens", str(n)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out == tok.decode(ref[:n]) + "\n"
    assert f"generated {n} tokens" in cap.err
