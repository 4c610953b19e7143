"""Patched tiny models give the same loss and gradients as unpatched ones, for every supported family."""

import copy
import logging

import pytest
import torch
from torch import nn

import edgeft.kernels as K
from edgeft.arch import FAMILIES, kernel_specs

from .conftest import ON_CUDA, rel_err

KERNELS = kernel_specs()

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
SEGMENTS = [(0, 0, 5), (0, 5, 9), (0, 9, 12), (1, 0, 12)]


# RoPE and shape variants of the real families, each against its own unpatched model
LONGROPE = dict(
    rope_type="longrope", short_factor=[1.0, 1.3, 1.7, 2.2, 2.8, 3.5], long_factor=[1.5, 2.5, 3.5, 5.0, 7.0, 9.0]
)
VARIANTS = {
    # Phi-4-mini: partial rotary (3/4 of each head) and LongRoPE, here with the short factors (rows within the
    # original context) ...
    "phi3-partial-longrope": ("phi3", dict(partial_rotary_factor=0.75, rope_scaling=LONGROPE)),
    # ... and the long ones (original context 8 < the 12-token rows). Not packed: HF picks the factors by the
    # batch's largest position, so a packed row's short examples get the long ones, unlike the same examples alone
    "phi3-partial-longrope-long": (
        "phi3",
        dict(partial_rotary_factor=0.75, original_max_position_embeddings=8, rope_scaling=LONGROPE),
    ),
    # Llama 3.2: rope_type llama3 rescales the low frequencies
    "llama-llama3-rope": (
        "llama",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                high_freq_factor=4.0,
                low_freq_factor=1.0,
                original_max_position_embeddings=8,
            ),
        ),
    ),
    # Mistral NeMo: head_dim (32 here) is not hidden / heads (16)
    "mistral-head-dim": ("mistral", dict(head_dim=32)),
}


def tiny_config(model_type: str, **extra):
    from transformers import AutoConfig

    kw = dict(
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
    if model_type == "gemma3_text":  # sliding + full layers, (1 + w) norms, q/k norms, logit softcap, GeGLU-tanh
        kw.update(
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=30.0,
        )
    if model_type == "phi3":  # fused qkv and gate_up projections
        kw.pop("head_dim")
    if model_type == "mistral":
        kw["sliding_window"] = 5
    kw.update(extra)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager" if model_type == "gemma3_text" else "sdpa"
    return cfg


def build(model_type: str, lora: bool, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(model_type, **extra)).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = PHI3_TARGETS if model_type == "phi3" else TARGETS
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        for n, p in m.named_parameters():
            if "lora_B" in n:  # non-zero B, so the adapters' gradients all flow
                nn.init.normal_(p, std=0.1)
    return m.train()


def reference_loss(m, ids, labels, packed: bool):
    if not packed:
        return m(input_ids=ids, labels=labels).loss
    total, count = 0.0, 0
    for b, s0, s1 in SEGMENTS:  # each packed example on its own
        logits = m(input_ids=ids[b : b + 1, s0:s1]).logits[0, :-1].float()
        target = labels[b, s0 + 1 : s1]
        total = total + nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    return total / count


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def check_equivalence(model_type, lora, checkpoint=None, packed_cases=(False, True), extra=None):
    m = build(model_type, lora, **(extra or {}))
    ref_m = copy.deepcopy(m)
    replaced = K.patch(m, KERNELS, checkpoint=checkpoint)
    assert replaced
    ids = torch.randint(3, 300, (2, 12))
    for packed in packed_cases:
        labels = ids.clone()
        labels[0, :3] = -100
        if packed:
            labels[0, 5] = labels[0, 9] = -100  # the first token of each packed example predicts nothing
        for p in list(m.parameters()) + list(ref_m.parameters()):
            p.grad = None
        ref = reference_loss(ref_m, ids, labels, packed)
        ref.backward()
        loss_sum, n = K.causal_lm_loss(m, ids, labels, position_ids=POS if packed else None)
        (loss_sum / n).backward()
        assert abs((loss_sum / n).item() - ref.item()) < 1e-5
        got, want = grads(m), grads(ref_m)
        assert set(got) == set(want)
        worst = max(rel_err(got[k], want[k]) for k in want)
        assert worst < 1e-4, f"{model_type} packed={packed}: gradient rel err {worst:.1e}"
    return m, replaced


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_lora_model_same_loss_and_grads(model_type):
    m, replaced = check_equivalence(model_type, lora=True)
    kinds = {r.split(":")[0] for r in replaced}
    assert {"rms_norm", "attention", "mlp", "fused_ce"} <= kinds
    assert K.transformers_model(m)._edgeft_fused_ce is True


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_full_finetuning_same_loss_and_grads(model_type):
    check_equivalence(model_type, lora=False)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rope_and_shape_variants_same_loss_and_grads(variant):
    model_type, extra = VARIANTS[variant]
    packed = (False,) if variant.endswith("-long") else (False, True)
    m, _ = check_equivalence(model_type, lora=True, extra=extra, packed_cases=packed)
    cfg = K.transformers_model(m).config
    if variant.startswith("phi3"):  # the rotary table covers 3/4 of each head: the rest must pass through
        cos, _ = K.transformers_model(m).model.rotary_emb(torch.zeros(1), torch.arange(4)[None])
        assert cos.shape[-1] == cfg.hidden_size // cfg.num_attention_heads * 3 // 4


@pytest.mark.parametrize("model_type", ["qwen3", "phi3"])
def test_checkpointed_layers_same_loss_and_grads(model_type):
    _, replaced = check_equivalence(model_type, lora=True, checkpoint="plain", packed_cases=(True,))
    assert any(r.startswith("checkpoint[plain]") for r in replaced)


def test_hf_forward_with_labels_still_works_when_patched():
    m = build("llama", lora=True)
    ref = copy.deepcopy(m)
    K.patch(m, KERNELS)
    ids = torch.randint(3, 300, (2, 10))
    torch.testing.assert_close(m(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)


def test_unpatch_restores_stock_modules():
    m = build("qwen3", lora=True)
    hf = K.transformers_model(m)
    before = {name: dict(mod.__dict__) for name, mod in hf.named_modules()}
    replaced = K.patch(m, KERNELS, checkpoint="offload")
    assert hf.model.layers[0].mlp.__dict__.get("forward") is not None
    assert K.unpatch(m) == replaced
    after = {name: dict(mod.__dict__) for name, mod in hf.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert set(before[name]) == set(after[name]), name
    assert not hf.model._forward_pre_hooks
    assert K.unpatch(m) == []  # nothing left to undo


def test_flags_select_what_is_replaced():
    m = build("llama", lora=False)
    only_norm = K.patch(m, KERNELS, rope=False, glu=False, attention=False, varlen=False, fused_ce=False)
    assert only_norm and all(r.startswith("rms_norm:") for r in only_norm)
    assert not hasattr(K.transformers_model(m), "_edgeft_fused_ce")
    again = K.patch(m, KERNELS, rms_norm=False, attention=False, varlen=False, fused_ce=False)  # re-patch from stock
    assert again and all(r.startswith("mlp:") for r in again)
    with pytest.raises(TypeError):
        K.patch(m, KERNELS, fused_everything=True)


def test_unsupported_architecture_warns_once_and_keeps_stock(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with caplog.at_level(logging.WARNING, logger="edgeft.kernels"):
        assert K.patch(m, KERNELS) == []
    warnings = [r for r in caplog.records if r.name == "edgeft.kernels"]
    assert len(warnings) == 1 and "gpt2" in warnings[0].getMessage()
    assert all("forward" not in mod.__dict__ for mod in m.modules())


@pytest.mark.skipif(ON_CUDA, reason="loads the built-in model on the CPU")
def test_builtin_tiny_model_bf16(monkeypatch, tmp_path):
    # the repository's own tiny model, in bf16 with LoRA: patched loss within bf16 tolerance of stock
    import os

    from peft import LoraConfig, get_peft_model

    from edgeft.models import load_model, resolve_model

    monkeypatch.setenv("EDGEFT_CACHE", os.environ.get("EDGEFT_CACHE", str(tmp_path)))
    model, _ = load_model(resolve_model("tiny-llama"), dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS)).train()
    ref = copy.deepcopy(model)
    K.patch(model, KERNELS, checkpoint="plain")
    ids = torch.randint(10, 8000, (2, 16))
    s, n = K.causal_lm_loss(model, ids, ids)
    loss = s / n
    loss.backward()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"
    g, g_ref = dict(model.named_parameters())[name].grad, dict(ref.named_parameters())[name].grad
    assert g_ref.abs().sum() > 0 and rel_err(g, g_ref) < 5e-2


def test_patched_model_under_transformers_gradient_checkpointing():
    # checkpoint=None leaves checkpointing to transformers; the fused Functions must survive its recompute
    m = build("llama", lora=True)
    ref = copy.deepcopy(m)
    K.patch(m, KERNELS)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 300, (2, 12))
    s, n = K.causal_lm_loss(m, ids, ids)
    (s / n).backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    got, want = grads(m), grads(ref)
    assert set(got) == set(want)
    assert max(rel_err(got[k], want[k]) for k in want) < 1e-4
