"""Apply the kernels to transformers models: explicit, per family, per flag, reversible.

``patch(model, spec, **flags)`` finds the transformers model (also inside a PEFT wrapper:
:func:`transformers_model`), applies the kernels the family's ``KernelSpec`` describes (the caller's table,
``edgeft.arch``; this package imports nothing of edgeft) and returns what it replaced. Each replacement is an
instance attribute or a forward pre-hook, recorded so that ``unpatch(model)`` restores the stock modules exactly;
no source is rewritten and no class modified, so other models of the same class are untouched.

Flags: ``rms_norm``, ``attention`` (QKV/O through the fast LoRA Function, q/k norms, in-place RoPE, the configured
or varlen attention), ``glu`` (fused activation; with ``lora`` the whole LoRA MLP), ``varlen`` (packed rows never
attend across examples), ``checkpoint`` ("offload"/"plain" per decoder layer) and ``fused_ce`` (the loop computes
the loss from hidden states, no logits). Anything a fast path cannot represent exactly (DoRA, several adapters, a
KV cache during generation) falls back to the stock module call at run time; QAT modules describe themselves
(``edgeft_projection``), so patch and ``qat.prepare`` compose in either order. Details: docs/kernels.md.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import packed_batch_from_cu_seqlens, packed_batch_from_position_ids, varlen_attention
from .checkpoint import MODES, OffloadChain, checkpoint_layer
from .cross_entropy import IGNORE_INDEX, lm_head_loss
from .lora import HF_ACTIVATIONS, glu, lora_linear, lora_mlp, projection_of
from .rms_norm import rms_norm
from .rope import rope_, rope_reference

log = logging.getLogger("edgeft.kernels")

_MISSING = object()
DEFAULT_FLAGS: dict[str, Any] = dict(
    rms_norm=True, rope=True, glu=True, lora=True, attention=True, varlen=True, fused_ce=True, checkpoint=None
)


class _Record:
    """What patch() changed on one model, in order, so that unpatch() can undo it exactly."""

    def __init__(self) -> None:
        self.attrs: list[tuple[Any, str, Any]] = []
        self.hooks: list[Any] = []
        self.replaced: list[str] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self.attrs.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for h in reversed(self.hooks):
            h.remove()
        for obj, name, old in reversed(self.attrs):
            if old is _MISSING:
                if name in obj.__dict__:
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.attrs.clear()
        self.hooks.clear()


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside a PEFT wrapper (PeftModel -> LoraModel -> model), or model itself."""
    m = model
    for _ in range(3):
        if hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        elif type(m).__name__ == "LoraModel" and hasattr(m, "model"):
            m = m.model
        else:
            break
    return m


def decoder_stack(hf: nn.Module) -> nn.Module:
    """The decoder (``LlamaModel`` & co.) of a ``*ForCausalLM``, or hf itself when it is the decoder."""
    if hasattr(hf, "layers"):
        return hf
    inner = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise ValueError(f"cannot find the decoder layers of {type(hf).__name__}")


# --- replacement forwards ---------------------------------------------------------------------------------------


def _rms_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    spec = self._edgeft_norm
    return rms_norm(x, self.weight, getattr(self, spec.eps_attr), spec.offset)


@dataclass(frozen=True)
class KernelSpec:
    """What :func:`patch` needs to know about one decoder family (one row of the caller's table)."""

    norm_class: str  # the RMSNorm class name, e.g. "LlamaRMSNorm"
    norm_eps_attr: str = "variance_epsilon"  # the norm module's epsilon attribute
    norm_offset: float = 0.0  # Gemma: the norm multiplies by (offset + w)
    fused_qkv: bool = False  # Phi-3: one qkv_proj (q, k, v rows in that order)
    qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm on q and k per head, before RoPE
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj (gate rows first)
    act_attr: str = "hidden_act"  # the config attribute naming the MLP activation
    # where the stock attention reads its sliding window: None (it has none), "config" (config.sliding_window, every
    # layer: Mistral, Phi-3) or "layer" (the attention module's own sliding_window, per layer type: Qwen2/3, Gemma3)
    window: str | None = None


WINDOWS = (None, "config", "layer")


@dataclass(frozen=True)
class _NormSpec:
    eps_attr: str
    offset: float


@dataclass(frozen=True)
class _AttnSpec:
    fused_qkv: bool  # Phi-3: one qkv_proj
    qk_norm: bool  # Qwen3, Gemma3
    window: str | None  # KernelSpec.window: the sliding window the stock forward passes to the attention function
    rope: bool
    lora: bool
    varlen: bool


def _attn_extra(attn: nn.Module, window: str | None) -> dict:
    """What the stock forward passes to the attention function besides q/k/v, mask, dropout and scaling."""
    if window == "config":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if window == "layer":
        return {"sliding_window": attn.sliding_window}
    return {}


@dataclass(frozen=True)
class _MLPSpec:
    fused_gate_up: bool  # Phi-3: one gate_up_proj, gate first
    act: str
    lora: bool


def _project(x: torch.Tensor, modules: list[nn.Module], use_lora: bool, input_kept: bool = False) -> list[torch.Tensor]:
    """Outputs of several projections of the same x; eligible ones share one fast LoRA Function call
    (``input_kept``: see ``lora_linear``)."""
    if not use_lora:
        return [m(x) for m in modules]
    projs = [projection_of(m) for m in modules]
    fast = [i for i, p in enumerate(projs) if p is not None]
    outs: list[torch.Tensor | None] = [None] * len(modules)
    if fast:
        x2 = x.reshape(-1, x.shape[-1])
        # 2-D outputs that own their storage (not views), so RoPE can rotate them in place
        for i, o in zip(fast, lora_linear(x2, [projs[i] for i in fast], input_kept)):
            outs[i] = o
    for i, m in enumerate(modules):
        if outs[i] is None:
            o = m(x)
            outs[i] = o.reshape(-1, o.shape[-1])
    return outs  # type: ignore[return-value]


def _stock(self: nn.Module, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    spec: _AttnSpec = self._edgeft_attn
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None or args or position_embeddings is None or kwargs.get("output_attentions"):
        kwargs.pop("edgeft_packed", None)
        return _stock(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    B, S = hidden_states.shape[:2]
    hd = self.head_dim
    cfg = self.config
    n_q, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if spec.fused_qkv:
        (qkv,) = _project(hidden_states, [self.qkv_proj], spec.lora)
        q, k, v = qkv.split([n_q * hd, n_kv * hd, n_kv * hd], dim=-1)
    else:
        q, k, v = _project(hidden_states, [self.q_proj, self.k_proj, self.v_proj], spec.lora)
    if spec.qk_norm:
        q = self.q_norm(q.view(B, S, n_q, hd))
        k = self.k_norm(k.view(B, S, n_kv, hd))
    cos, sin = position_embeddings
    if spec.rope:
        q, k = rope_(q, k, cos, sin, head_dim=hd, seq_len=S)
    else:
        q, k = rope_reference(q.reshape(B, S, n_q, hd), k.reshape(B, S, n_kv, hd), cos, sin)
    q4, k4, v4 = q.reshape(B, S, n_q, hd), k.reshape(B, S, n_kv, hd), v.reshape(B, S, n_kv, hd)
    extra = _attn_extra(self, spec.window)
    packed = kwargs.pop("edgeft_packed", None)
    if packed is None and spec.varlen and kwargs.get("cu_seq_lens_q") is not None:
        packed = packed_batch_from_cu_seqlens(kwargs["cu_seq_lens_q"], kwargs.get("max_length_q"))
    dropout = self.attention_dropout if self.training else 0.0
    for key in ("cache", "past_key_values", "use_cache"):
        kwargs.pop(key, None)
    if packed is not None and spec.varlen and dropout == 0.0:
        o = varlen_attention(
            q4.reshape(B * S, n_q, hd),
            k4.reshape(B * S, n_kv, hd),
            v4.reshape(B * S, n_kv, hd),
            packed,
            causal=getattr(self, "is_causal", True),
            scale=self.scaling,
            window=extra.get("sliding_window"),
            softcap=extra.get("softcap"),
        )
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = getattr(sys.modules[type(self).__module__], "eager_attention_forward")
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager)
        o, _ = interface(
            self,
            q4.transpose(1, 2),
            k4.transpose(1, 2),
            v4.transpose(1, 2),
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **extra,
            **kwargs,
        )
    o = o.reshape(B, S, n_q * hd)
    # the attention keeps o for its backward: o_proj need not save a fake-quantized copy of it too
    (out,) = _project(o, [self.o_proj], spec.lora, input_kept=True)
    return out.view(B, S, -1), None


def _mlp_forward(self, x):
    spec: _MLPSpec = self._edgeft_mlp
    if spec.fused_gate_up:
        (gu,) = _project(x, [self.gate_up_proj], spec.lora)
        g, u = gu.chunk(2, dim=-1)
        h = glu(g, u, spec.act)
        (out,) = _project(h, [self.down_proj], spec.lora)
        return out.view(*x.shape[:-1], -1)
    if spec.lora:
        ps = [projection_of(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(p is not None for p in ps):
            return lora_mlp(x, *ps, spec.act)
    return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), spec.act))


def _layer_forward(self, hidden_states, *args, **kwargs):
    mode, chain, rng = self._edgeft_ckpt
    if self.training and torch.is_grad_enabled():
        # As transformers does under checkpointing: no KV cache writes (they would happen twice).
        for key in ("cache", "past_key_values", "layer_past"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint_layer(lambda h: _stock(self, h, *args, **kwargs), hidden_states, mode, chain, rng)
    return _stock(self, hidden_states, *args, **kwargs)


# --- shared patch steps -----------------------------------------------------------------------------------------


def _patch_norms(rec: _Record, root: nn.Module, cls_name: str, spec: _NormSpec) -> None:
    for name, m in root.named_modules():
        if type(m).__name__ == cls_name:
            rec.set(m, "_edgeft_norm", spec)
            rec.set(m, "forward", types.MethodType(_rms_norm_forward, m))
            rec.replaced.append(f"rms_norm:{name}")


def _layers(stack: nn.Module) -> list[nn.Module]:
    return list(stack.layers)


def _patch_attention(rec: _Record, stack: nn.Module, spec: _AttnSpec) -> None:
    for i, layer in enumerate(_layers(stack)):
        attn = layer.self_attn
        rec.set(attn, "_edgeft_attn", spec)
        rec.set(attn, "forward", types.MethodType(_attention_forward, attn))
        rec.replaced.append(f"attention:layers.{i}.self_attn")


def _patch_mlp(rec: _Record, stack: nn.Module, fused_gate_up: bool, hf_act: str, use_lora: bool) -> None:
    act = HF_ACTIVATIONS.get(hf_act)
    if act is None:
        log.warning("edgeft.kernels: activation %r has no fused kernel; MLPs stay stock", hf_act)
        return
    spec = _MLPSpec(fused_gate_up, act, use_lora)
    for i, layer in enumerate(_layers(stack)):
        rec.set(layer.mlp, "_edgeft_mlp", spec)
        rec.set(layer.mlp, "forward", types.MethodType(_mlp_forward, layer.mlp))
        rec.replaced.append(f"mlp:layers.{i}.mlp")


def _patch_checkpoint(rec: _Record, stack: nn.Module, mode: str) -> None:
    chain = OffloadChain()
    for i, layer in enumerate(_layers(stack)):
        rng = (
            any(isinstance(m, nn.Dropout) and m.p > 0 for m in layer.modules())
            or (getattr(getattr(layer, "self_attn", None), "attention_dropout", 0.0) or 0.0) > 0
        )
        rec.set(layer, "gradient_checkpointing", False)  # ours replaces transformers' own
        rec.set(layer, "_edgeft_ckpt", (mode, chain, rng))
        rec.set(layer, "forward", types.MethodType(_layer_forward, layer))
        rec.replaced.append(f"checkpoint[{mode}]:layers.{i}")

    def reset_chain(module, args, kwargs):
        chain.reset()

    rec.hooks.append(stack.register_forward_pre_hook(reset_chain, with_kwargs=True))


def _patch_varlen(rec: _Record, stack: nn.Module) -> None:
    def find_packing(module, args, kwargs):
        if not module.training or kwargs.get("edgeft_packed") is not None:
            return None
        if kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            return None
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            packed = packed_batch_from_cu_seqlens(cu, kwargs.get("max_length_q"))
        else:
            pos = kwargs.get("position_ids")
            if pos is None or kwargs.get("attention_mask") is not None or len(args) > 1:
                return None  # padding masks go through transformers' masks
            packed = packed_batch_from_position_ids(pos)
        if packed is None:
            return None
        kwargs["edgeft_packed"] = packed
        return args, kwargs

    rec.hooks.append(stack.register_forward_pre_hook(find_packing, with_kwargs=True))
    rec.replaced.append("varlen:decoder position_ids -> cu_seqlens")


def _apply(rec: _Record, hf: nn.Module, flags: dict, spec: KernelSpec) -> None:
    stack = decoder_stack(hf)
    if spec.window not in WINDOWS:
        raise ValueError(f"KernelSpec.window must be one of {WINDOWS}, got {spec.window!r}")
    if flags["rms_norm"]:
        _patch_norms(rec, hf, spec.norm_class, _NormSpec(spec.norm_eps_attr, spec.norm_offset))
    if flags["attention"]:
        attn = _AttnSpec(
            spec.fused_qkv, spec.qk_norm, spec.window, bool(flags["rope"]), bool(flags["lora"]), bool(flags["varlen"])
        )
        _patch_attention(rec, stack, attn)
        if flags["varlen"]:
            _patch_varlen(rec, stack)
    if flags["glu"]:
        _patch_mlp(rec, stack, spec.fused_gate_up, getattr(hf.config, spec.act_attr), bool(flags["lora"]))
    if flags["checkpoint"]:
        if flags["checkpoint"] not in MODES:
            raise ValueError(f"checkpoint must be one of {MODES} or None, got {flags['checkpoint']!r}")
        _patch_checkpoint(rec, stack, flags["checkpoint"])
    if flags["fused_ce"]:
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        # a QAT head (FakeQuantLinear, torchao's FakeQuantizedLinear) is fine: lm_head_operands applies its quantizers
        plain = type(head) is nn.Linear or hasattr(head, "weight_fake_quantizer")
        if isinstance(head, nn.Linear) and plain and head.bias is None:
            rec.set(hf, "_edgeft_fused_ce", True)
            rec.replaced.append("fused_ce:lm_head")
        else:
            log.warning("edgeft.kernels: the LM head is not a plain bias-free Linear; fused cross-entropy is off")


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of the transformers model (also inside a PEFT wrapper)."""
    return getattr(getattr(transformers_model(model), "config", None), "model_type", None)


def patch(model: nn.Module, spec: KernelSpec | Mapping[str, KernelSpec] | None, **flags: Any) -> list[str]:
    """Replace modules of a transformers model (optionally PEFT-wrapped) with the fused kernels.

    ``spec``: the family's :class:`KernelSpec`, or a table of them by ``config.model_type`` (``edgeft.arch.KERNELS``).
    Flags (default): rms_norm (True), rope (True), glu (True), lora (True), attention (True), varlen (True),
    fused_ce (True), checkpoint (None | "offload" | "plain"). Returns the list of replacements
    ("op:module.path"); a model with no spec (None, or its model_type not in the table) keeps its stock modules,
    logs one warning and returns []. Patching twice re-patches from the stock state.
    """
    unknown = set(flags) - set(DEFAULT_FLAGS)
    if unknown:
        raise TypeError(f"patch() got unknown flags: {sorted(unknown)}")
    opts = {**DEFAULT_FLAGS, **flags}
    hf = transformers_model(model)
    unpatch(model)
    mt = model_type(hf)
    if isinstance(spec, Mapping):
        spec = spec.get(mt)
    if spec is None:
        log.warning("edgeft.kernels: no kernels for architecture %r; the model keeps its stock modules", mt)
        return []
    rec = _Record()
    try:
        _apply(rec, hf, opts, spec)
    except Exception:
        rec.undo()
        raise
    hf._edgeft_patch_record = rec
    return list(rec.replaced)


def unpatch(model: nn.Module) -> list[str]:
    """Undo patch(); returns what had been replaced."""
    hf = transformers_model(model)
    rec = hf.__dict__.get("_edgeft_patch_record")
    if rec is None:
        return []
    rec.undo()
    del hf._edgeft_patch_record
    return list(rec.replaced)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of a (patched or not) causal LM without materialising logits.

    Runs the decoder stack, shifts ``labels`` (B, S) by one (the last position of each row gets -100) and calls
    :func:`lm_head_loss` with the output embedding and the model's final-logit softcap. Returns
    (summed loss fp32, number of target tokens). For packed rows, the collator must set -100 on each example's
    first token (so no example predicts the next one's start), as transformers' flattening collator does.
    """
    hf = transformers_model(model)
    stack = decoder_stack(hf)
    out = stack(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    head = hf.get_output_embeddings()
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    h, w = lm_head_operands(head, hidden.reshape(-1, hidden.shape[-1]))
    return lm_head_loss(h, w, shifted.reshape(-1), softcap, chunk_rows=head_copy_chunk_rows(head, h, w))


def head_copy_chunk_rows(head: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> int | None:
    """Logit rows per loss chunk when the head's weight is a (fake-quantized) copy made for this loss: the copy is
    taken out of the chunk's memory budget, so the loss's peak stays where it is without QAT (None: the loss
    chooses). At most half the budget goes: each chunk adds a full (vocab, hidden) fp32 pass to a trained
    head's gradient, and a 128k x 2048 copy would otherwise shrink the chunks to 64 rows (a 2.2x slower
    Llama-3.2-1B step, measured). A copy a ``"weights"`` cache holds for the whole step costs the loss nothing."""
    if weight is head.weight:
        return None
    cache = getattr(getattr(head, "weight_fake_quantizer", None), "cache", None)
    if cache is not None and cache.form == "weights" and head.weight.requires_grad:
        return None
    from .cross_entropy import MIN_CHUNK_ROWS, choose_chunk_rows

    vocab, elem = weight.shape[0], hidden.element_size()
    rows = choose_chunk_rows(1 << 30, vocab, elem, hidden.device)
    copy_rows = weight.numel() * weight.element_size() // (vocab * elem)
    return max(MIN_CHUNK_ROWS, max(rows - copy_rows, rows // 2) // MIN_CHUNK_ROWS * MIN_CHUNK_ROWS)


def lm_head_operands(head: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, weight) as the head's forward would use them: a QAT-prepared head's fake quantizers applied, so the
    fused loss trains on the deployed grid too (straight-through gradients)."""
    w = head.weight
    afq = getattr(head, "activation_fake_quantizer", None)
    wfq = getattr(head, "weight_fake_quantizer", None)
    if afq is not None:
        hidden = afq(hidden)
    if wfq is not None:
        w = wfq(w)
    return hidden, w
