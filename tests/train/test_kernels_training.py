"""Training with the fused kernels learns exactly what training without them learns (CPU: Triton interpreter).

Runs the real loop (fused AdamW) so that anything cached across steps inside the kernels must follow the
optimizer's updates.
"""

import json

import pytest
import torch

from edgeft.config import TrainConfig
from edgeft.kernels._common import interpreting


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)")
@pytest.mark.parametrize("qat", [None])
def test_lora_with_kernels_matches_without(tmp_path, qat):
    from edgeft import pipeline

    losses = {}
    for kernels in ("on", "off"):
        # with the kernels, also through edgeft's per-layer checkpointing (recompute in the backward)
        cfg = TrainConfig(
            model="tiny-qwen3",
            mode="lora",
            qat=qat,
            ptq=False,
            max_steps=4,
            batch_size=4,
            lr=5e-3,
            warmup_ratio=0.0,
            kernels=kernels,
            out=str(tmp_path / kernels),
            progress=False,
            gradient_checkpointing="plain" if kernels == "on" else "off",
        )
        run = pipeline.train(cfg)
        info = json.loads((run / "model" / "edgeft.json").read_text())
        if kernels == "on":
            assert "checkpoint[plain]:layers.0" in info["kernels"]
        losses[kernels] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    on, off = losses["on"], losses["off"]
    assert off[-1] < off[0] - 0.05  # the run learns
    assert on == pytest.approx(off, rel=2e-3), (on, off)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_transformers_checkpointing_without_kernels_learns_the_same(tmp_path, mode):
    """--kernels off --gradient-checkpointing plain: transformers' checkpointing, same losses as none."""
    from edgeft import pipeline

    losses = {}
    for ckpt in ("plain", "off"):
        cfg = TrainConfig(
            model="tiny-llama",
            mode=mode,
            ptq=False,
            max_steps=3,
            batch_size=4,
            lr=5e-3,
            warmup_ratio=0.0,
            kernels="off",
            gradient_checkpointing=ckpt,
            out=str(tmp_path / f"{mode}-{ckpt}"),
            progress=False,
        )
        run = pipeline.train(cfg)
        info = json.loads((run / "model" / "edgeft.json").read_text())
        assert info["gradient_checkpointing"] == ("hf" if ckpt == "plain" else None)
        losses[ckpt] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["plain"] == pytest.approx(losses["off"], rel=1e-5)


def test_auto_checkpoints_only_when_the_activations_do_not_fit(monkeypatch):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft.training.model import activation_bytes, checkpoint_mode

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
    )
    cfg = TrainConfig(model="tiny-llama", batch_size=4, max_seq_length=512, dtype="bf16")
    # by hand: 1.25 * (6*64 + 4*64 + 3*32 + 3*128) elements * 2048 tokens * 2 layers * 2 bytes
    assert activation_bytes(cfg, model) == int(1.25 * (6 * 64 + 4 * 64 + 3 * 32 + 3 * 128) * 2048 * 2 * 2)
    assert checkpoint_mode(cfg, model, "cpu", kernels=False) is None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = weights * 4 + activation_bytes(cfg, model)  # full fine-tuning: + grads and two Adam moments
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need / 0.7) + 1024, 10**12))
    assert checkpoint_mode(cfg, model, "cuda", kernels=True) is None
    # plain: each layer's input (tokens x hidden) and one layer's activations instead of all activations
    plain = weights * 4 + 2048 * 64 * 2 * 2 + activation_bytes(cfg, model) // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(need / 0.7) - 1024, 10**12))
    assert checkpoint_mode(cfg, model, "cuda", kernels=True) == "plain"
    assert checkpoint_mode(cfg, model, "cuda", kernels=False) == "hf"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(plain / 0.7) + 1024, 10**12))
    assert checkpoint_mode(cfg, model, "cuda", kernels=True) == "plain"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(plain / 0.7) - 1024, 10**12))
    assert checkpoint_mode(cfg, model, "cuda", kernels=True) == "offload"
    cfg.hardware.gradient_checkpointing = "plain"
    assert checkpoint_mode(cfg, model, "cpu", kernels=True) == "plain"


def test_qat_keeps_quantized_weights_only_where_the_copy_is_small():
    """qat_weight_cache: "weights" (one quantized copy of the linears) when that copy is at most 8% of the step's
    estimated memory and nothing is checkpointed or sharded, else "codes"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft.training.model import activation_bytes, qat_weight_cache

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
        )
    )
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    copy = sum(m.weight.numel() * 2 for m in model.modules() if type(m) is torch.nn.Linear)  # the head included
    for seq, expect in ((512, "weights"), (8, "codes")):
        cfg = TrainConfig(model="tiny-llama", mode="full", batch_size=4, max_seq_length=seq, dtype="bf16")
        step = weights * 4 + activation_bytes(cfg, model)
        assert (copy <= 0.08 * step) == (expect == "weights")  # the two cases straddle the threshold
        assert qat_weight_cache(cfg, model, checkpointing=False, sharded=False) == expect
        assert qat_weight_cache(cfg, model, checkpointing=False, sharded=False, device="cpu") == "weights"
    cfg = TrainConfig(model="tiny-llama", mode="full", batch_size=4, max_seq_length=512, dtype="bf16")
    assert qat_weight_cache(cfg, model, checkpointing=True, sharded=False) == "codes"
    assert qat_weight_cache(cfg, model, checkpointing=False, sharded=True) == "codes"
