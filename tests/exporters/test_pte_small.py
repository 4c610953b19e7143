"""The smaller .pte formats on tiny-llama: 4-bit group embeddings (ExecuTorch's embedding_4bit) from a plan that
trains them, and the int8 KV cache (ExecuTorch's quantized KV cache) against the float-cache program."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeft import qat  # noqa: E402
from edgeft.devices.executorch_runtime import PteRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

SEQ = 32
TEXT = "The committee met on Tuesday to discuss the budget, 42 items in all, and adjourned at noon."


def _ops(path: str) -> set[str]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(Path(path).read_bytes())
    plan = next(p for p in getattr(prog, "program", prog).execution_plan if p.name == "forward")
    return {o.name for o in plan.operators}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int4_embedding_of_the_plan_is_embedding_4bit(tmp_path):
    """A device-fit plan with int4 embeddings converts them (torchao int4 groups of 32); the exporter carries them as
    embedding_4bit with the same codes and fp32 scales: the converted model's logits to float rounding."""
    model, tok = load_model(resolve_model("tiny-llama"))
    plan = qat.resolve("auto", group_size=32, embedding="int4-per-group")
    cm, rec = qat.convert(model, plan)
    w = cm.get_input_embeddings().weight
    assert w.target_dtype == torch.int4 and list(w.block_size) == [1, 32]
    src = qat.save_converted(cm, tok, rec, tmp_path / "src")
    r = pte.export(src, tmp_path / "out", max_seq_len=SEQ)
    assert r["embedding"] == "int4 (embedding_4bit)" and r["warnings"] == []
    assert "quantized_decomposed::embedding_4bit" in _ops(r["path"])
    assert "quantized_decomposed::embedding_byte" not in _ops(r["path"])
    vocab, dim = w.shape
    emb_bytes = vocab * dim // 2 + vocab * dim // 32 * 4  # the plan's size model says the same
    from edgeft.qat import plan as fit

    assert fit.tensor_bytes("emb-int4", vocab, dim, "pte") == emb_bytes
    assert abs(r["bytes"] - r["expected_bytes"]) < 0.02 * r["expected_bytes"]
    # an int8 embedding would hold vocab * (dim + 4) bytes: the file is that much smaller, less the nibbles
    assert r["expected_bytes"] == pte._expected_bytes(cm)
    ref, _, _ = qat.load_converted(src)
    ids = tok(TEXT).input_ids[:SEQ]
    rt = PteRuntime(r["path"])
    try:
        got, want = rt.logits(ids), EagerRuntime(ref).logits(ids)
        assert _rel(got, want) <= r["validation"]["tolerance"]["rel"]
        assert r["validation"]["noise_rel_err"] > 0  # int8 activations: noise-scaled, measured
    finally:
        rt.close()
    # the embedding itself: the program's rows equal torchao's dequantized int4 rows (first layer's input)
    rows = pte.Int4Embedding(ref.get_input_embeddings())(torch.tensor([ids]))
    assert torch.equal(rows, torch.nn.functional.embedding(torch.tensor([ids]), w.dequantize()))


def test_int8_kv_cache_within_the_noise_of_the_float_cache(tmp_path):
    """The float model with an int8 KV cache: ExecuTorch's quantized cache ops in the file, a cache a quarter the
    size plus its per-(position, head) parameters, and logits within the measured noise of int8 q/k/v rounding of the
    float-cache program (and not equal to it: the cache really is int8)."""
    src = resolve_model("tiny-llama")
    f = pte.export(src, tmp_path / "fp32", max_seq_len=SEQ)
    q = pte.export(src, tmp_path / "int8", max_seq_len=SEQ, kv_cache="int8")
    ops = _ops(q["path"])
    assert "llama::custom_quantized_sdpa" in ops and "llama::custom_sdpa" not in ops
    assert "llama::custom_sdpa" in _ops(f["path"])
    kvf, kvq = f["kv_cache"], q["kv_cache"]
    assert (kvf["dtype"], kvq["dtype"]) == ("fp32", "int8")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert kvq["bytes"] * 4 * head_dim == kvf["bytes"] * (head_dim + 5)
    noise = q["validation"]["noise_rel_err"]
    assert 0 < noise < 0.05
    _, tok = load_model(src)
    ids = tok(TEXT).input_ids[:SEQ]
    rf, rq = PteRuntime(f["path"]), PteRuntime(q["path"])
    try:
        lf, lq = rf.logits(ids), rq.logits(ids)
        # incremental decode through the int8 cache too
        step = torch.cat([rq._step(ids[:5], 0)] + [rq._step([t], 5 + i) for i, t in enumerate(ids[5:])], 0)
    finally:
        rf.close()
        rq.close()
    assert 0 < _rel(lq, lf) <= 4 * noise
    assert _rel(step, lf) <= 4 * noise
    assert float((lq.argmax(-1) == lf.argmax(-1)).float().mean()) >= 0.9


def test_bad_small_options(tmp_path):
    src = resolve_model("tiny-llama")
    with pytest.raises(EdgeftError, match="embedding must be one of int8, int4"):
        pte.export(src, tmp_path / "x", embedding="int2")
    with pytest.raises(EdgeftError, match="kv_cache must be one of fp32, int8"):
        pte.export(src, tmp_path / "x", kv_cache="fp16")
    with pytest.raises(EdgeftError, match="embedding treatments come with presets"):
        qat.resolve("int4", embedding="int4-per-group")
    assert not (tmp_path / "x").exists()
