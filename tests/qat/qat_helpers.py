"""Shared helpers for the QAT tests: tiny random transformers models, relative errors, per-dtype bounds."""

import torch
from numerics import TOL, assert_close, rel_err  # noqa: F401 (re-exported to the tests)
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The kernels against the plain-autograd (or unpatched) model under int8 activations (docs/testing.md): the kernels
# compute in another, equally correct summation order, and an int8 activation lying within that rounding of a grid
# tie rounds to the neighbouring integer in one of the two (a "flip"), which moves these tiny models' loss and
# gradients far more than fp32 rounding does. Measured over input draws x {AVX2, ATEN_CPU_CAPABILITY=default}: 31 x
# {llama, qwen3} LoRA (the reference under eager vs sdpa attention too) and 12 x {full llama, full qwen3, learned
# scales full and LoRA}: up to 3.8e-5 (loss) and 1.6e-2 (a gradient, relative norm); without a flip 2e-7 and 2e-6.
# A real bug is larger: a LoRA scale 1% off in one projection moves a gradient by 9e-2 to 2.3e-1
# (test_lora_qat.py::test_flip_bounds_catch_a_wrong_lora_scale).
FLIP_LOSS, FLIP_GRAD = 1e-4, 5e-2


def tiny_model(model_type: str, lora: bool, seed: int = 0, **kw) -> nn.Module:
    """A 2-layer random model of a supported family (group-32 friendly sizes), optionally with LoRA (B != 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    args = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
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
