"""Shared helpers for the QAT tests: tiny random transformers models, relative errors, per-dtype bounds."""

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# bounds on the relative error against an fp64 reference (bf16 is loose: the interpreter truncates fp32 -> bf16)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= TOL[dtype] * scale, f"relative error {err:.2e} > {TOL[dtype] * scale:.1e}"


def tiny_model(model_type: str, lora: bool, **kw) -> nn.Module:
    """A 2-layer random model of a supported family (group-32 friendly sizes), optionally with LoRA (B != 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    cfg = AutoConfig.for_model(model_type, **{**args, **kw})
    cfg._attn_implementation = "sdpa"
    m = AutoModelForCausalLM.from_config(cfg).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
        for n, p in m.named_parameters():
            if "lora_B" in n:
                nn.init.normal_(p, std=0.1)
    return m.train()
