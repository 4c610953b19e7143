"""ExecuTorch .pte export of Gemma3 text (tiny-gemma3), against the eager transformers model.

tiny-gemma3's sliding-window layers see 16 keys; the texts here are longer, and generation runs past the window
through the program's KV cache, so a window the program did not apply shows in the logits. The exporter's own
validation is also shown to refuse programs built without the window or without Gemma's (1 + w) norms.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeft import qat  # noqa: E402
from edgeft.arch import FAMILIES  # noqa: E402
from edgeft.devices.executorch_runtime import PteRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

NAME = "tiny-gemma3"
MAX_SEQ = 64
# 60-70 tokens with the tiny tokenizer: four times the sliding window
LONG = (
    "The river bends twice before the old mill, where the water slows and the fish gather in the shade. "
    "On market days 1,204 people cross the bridge, and the baker sells 37 loaves before noon."
)


@pytest.fixture(scope="module")
def eager() -> tuple:
    return load_model(resolve_model(NAME))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """The float model and its phone-deployment PTQ conversion (the format QAT writes), exported."""
    out = tmp_path_factory.mktemp("pte-gemma3")
    model, tok = load_model(resolve_model(NAME))
    cm, rec = qat.convert(model, "phone-deployment")
    phone = qat.save_converted(cm, tok, rec, out / "phone-src")
    srcs = {"float": resolve_model(NAME), "phone": phone}
    return {k: (src, pte.export(src, out / k, max_seq_len=MAX_SEQ)) for k, src in srcs.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ["float", "phone"])
def test_export_validates(exports, case):
    _, r = exports[case]
    v = r["validation"]
    assert r["architecture"] == "gemma3_text"
    assert v["rel_err"] <= v["tolerance"]["rel"] and v["top1"] >= v["tolerance"]["top1"]
    assert v["runner_match"] and v["runner_tokens"] > 0 and v["num_bos"] == 1
    if case == "float":
        assert v["rel_err"] <= 1e-3 and v["greedy_agreement"] == 1.0
    else:
        assert r["scheme"] == "phone-deployment" and r["linears"] == {"dyn-act": 29}


def test_logits_past_the_window_match_eager(exports, eager):
    model, tok = eager
    ids = tok(LONG)["input_ids"]
    assert len(ids) > 3 * model.config.sliding_window
    want = EagerRuntime(model).logits(ids)
    with PteRuntime(exports["float"][1]["path"]) as rt:
        got = rt.logits(ids)
    assert got.shape == want.shape and _rel(got, want) <= 1e-3
    assert bool((got.argmax(-1) == want.argmax(-1)).all())


def test_generation_past_the_window_equals_eager(exports, eager):
    # 17-token prompt, 24 tokens one at a time through the KV cache: the window slides during decoding
    model, tok = eager
    ids = tok(LONG)["input_ids"][:17]
    want = EagerRuntime(model).generate(ids, 24, set())
    with PteRuntime(exports["float"][1]["path"]) as rt:
        assert rt.generate(ids, 24, set()) == want


def test_text_llm_runner_matches_eager(exports, eager):
    """ExecuTorch's own runner, as on a phone, with Gemma's BOS, greedy past the window."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    model, tok = eager
    path = Path(exports["float"][1]["path"])
    prompt = LONG[:90]
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) > model.config.sliding_window
    want = EagerRuntime(model).generate(ids, 12, {tok.eos_token_id})
    pieces: list[str] = []
    runner = TextLLMRunner(str(path), str(path.parent / "tokenizer.json"))
    cfg = GenerationConfig(echo=False, max_new_tokens=len(want), temperature=0.0, num_bos=1)
    runner.generate(prompt, cfg, token_callback=pieces.append)
    assert "".join(pieces) == tok.decode(want)


# --- ring caches: sliding-window layers keep window + max_seq_len - 1 rows, fewer than the context ---------------

RING_SEQ, RING_CTX = 24, 96  # chunks longer than the 16-token window; ring of 16 + 24 - 1 = 39 rows
RING = 16 + RING_SEQ - 1


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return pte.export(
        resolve_model(NAME), tmp_path_factory.mktemp("pte-gemma3-ring"), max_seq_len=RING_SEQ, max_context_len=RING_CTX
    )


def _cache_rows(path: str, kv_heads: int, head_dim: int) -> dict[int, int]:
    """Planned [1, rows, kv_heads, head_dim] tensors of the program longer than a chunk (the KV caches):
    rows -> count."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(Path(path).read_bytes())
    plan = next(p for p in getattr(prog, "program", prog).execution_plan if p.name == "forward")
    rows: dict[int, int] = {}
    for v in plan.values:
        t = v.val
        if type(t).__name__ == "Tensor" and t.allocation_info is not None and len(t.sizes) == 4:
            if list(t.sizes)[2:] == [kv_heads, head_dim] and t.sizes[1] > RING_SEQ:
                rows[t.sizes[1]] = rows.get(t.sizes[1], 0) + 1
    return rows


def test_ring_caches_are_window_sized(ring, eager):
    cfg = eager[0].config
    assert cfg.sliding_window == 16 and cfg.layer_types.count("sliding_attention") == 2
    kv = ring["kv_cache"]
    assert kv["ring_rows"] == RING and kv["ring_layers"] == 2 and kv["context_rows"] == RING_CTX
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    assert kv["bytes"] == row * (2 * RING + 2 * RING_CTX) and kv["full_length_bytes"] == row * 4 * RING_CTX
    # read back from the program: K and V of the two local layers ring-sized, of the two global ones full length
    assert _cache_rows(ring["path"], cfg.num_key_value_heads, cfg.head_dim) == {RING: 4, RING_CTX: 4}
    v = ring["validation"]
    assert v["rel_err"] <= 1e-3 and v["greedy_agreement"] == 1.0 and v["runner_match"]
    with PteRuntime(ring["path"]) as rt:
        assert rt.max_rewind == RING_SEQ


@pytest.mark.parametrize(
    "chunks",
    [
        [(0, 24), (24, 48), (48, None)],  # the runtime's own chunking: 24..47 crosses row 39 -> 0
        [(0, 20), (20, 44), (44, 45), (45, None)],  # a full chunk across the wrap, then one token, then the rest
        [(0, 3)] + [(i, i + 1) for i in range(3, 60)],  # token by token past 3x the window
    ],
)
def test_ring_logits_past_the_window_match_eager(ring, eager, chunks):
    model, tok = eager
    ids = tok(LONG + " " + LONG[:60])["input_ids"][:60]
    assert len(ids) == 60 > 3 * model.config.sliding_window and len(ids) > RING
    want = EagerRuntime(model).logits(ids)
    with PteRuntime(ring["path"]) as rt:
        rt.logits(ids[::-1])  # an earlier, different context in every row: a fresh call must not see it
        got = torch.cat([rt._step(ids[a : b or len(ids)], a) for a, b in chunks if a < len(ids)], 0)
    assert got.shape == want.shape and _rel(got, want) <= 1e-3
    assert bool((got.argmax(-1) == want.argmax(-1)).all())


def test_ring_generation_past_3x_the_window_equals_eager(ring, eager):
    # 17-token prompt, 40 tokens one at a time: positions up to 56, the ring wraps at 39
    model, tok = eager
    ids = tok(LONG)["input_ids"][:17]
    want = EagerRuntime(model).generate(ids, 40, set())
    with PteRuntime(ring["path"]) as rt:
        got = rt.generate(ids, 40, set())
    assert len(want) == 40 and got == want


def test_ring_continuations_longer_than_a_chunk(ring, eager):
    # the first continuation writes 29 positions (> max_seq_len 24): it overwrote prefix keys the second needs,
    # so the runtime runs the prefix again before it
    model, tok = eager
    ids = tok(LONG)["input_ids"]
    prefix, conts = ids[:20], [ids[20:50], ids[20:30], ids[5:15]]
    n = len(prefix)
    want = [EagerRuntime(model).logits(prefix + c)[n - 1 : n + len(c) - 1] for c in conts]
    with PteRuntime(ring["path"]) as rt:
        got = rt.continuation_logits(prefix, conts)
    for g, w in zip(got, want):
        assert g.shape == w.shape and _rel(g, w) <= 1e-3


@pytest.mark.parametrize("broken", ["window", "norm_offset"])
def test_program_without_gemma3_specifics_is_refused(tmp_path, monkeypatch, broken):
    # the window dropped (every layer global) or the norms taken as x * w: the exporter's validation says no
    off = {"window": None, "norm_offset": 0.0}[broken]
    monkeypatch.setitem(FAMILIES, "gemma3_text", replace(FAMILIES["gemma3_text"], **{broken: off}))
    with pytest.raises(EdgeftError, match="pte validation failed against the eager model"):
        pte.export(resolve_model(NAME), tmp_path / "out", max_seq_len=MAX_SEQ, dynamic_shape=False)
    assert not (tmp_path / "out" / "model.pte").exists()


@pytest.mark.parametrize("key,value", [("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True)])
def test_unsupported_gemma3_configs_are_one_line_errors(tmp_path, key, value):
    src = tmp_path / "src"
    shutil.copytree(resolve_model(NAME), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeftError, match="gemma3_text with .* is not supported") as e:
        pte.export(src, tmp_path / "out", max_seq_len=32)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
