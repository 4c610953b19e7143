"""QAT prepare: insert fake quantization that simulates the exact grid convert will write.

The grids are torchao's (the plan's fake-quant configs, translated by ``fake_quant.py``); the modules are edgeft's:

- LoRA: :class:`MergedFakeQuantLoraLinear` fake-quantizes the merged weight W + s·B·A (what the phone runs), with
  rank-r straight-through gradients for A and B and W frozen; it is a ``Projection`` for the fused kernels.
- Full fine-tuning: :class:`FakeQuantLinear` fake-quantizes each weight once per optimizer step, reused across
  micro-batches, recomputation and the backward (cache "codes", "weights" or "off");
  :class:`FakeQuantEmbedding` quantizes only the rows it looks up.
- Memory: no fake-quantized weight is saved for the backward unless a cache holds it anyway (it is rebuilt there),
  so a QAT step saves the same bytes as the step without QAT (tests/qat/test_saved_tensors.py).
- ``lora_dropout > 0`` adds only the adapter's zero-mean dropout noise in training; eval and convert see exactly
  the deployed weight.

The derivations and trade-offs: docs/qat.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.errors import EdgeftError
from edgeft.kernels.lora import is_lora_linear

from .fake_quant import (
    MSE_RATIOS,
    ActQuant,
    WeightQuant,
    initial_scale,
    learned_scale,
    specs_from_configs,
    weight_spec,
)
from .schemes import QATPlan, resolve


def _group_ok(in_features: int, plan: QATPlan, name: str | None = None) -> bool:
    return plan.group_size is None or plan.is_int8(name) or in_features % plan.group_size == 0


def check_int8_modules(plan: QATPlan, linear_names: list[str]) -> None:
    """One clear error when an ``int8_modules`` entry names no linear of the model."""
    from .schemes import module_matches

    own = {n.rsplit(".", 1)[-1] for n in linear_names}
    missing = [m for m in plan.int8_modules if not any(module_matches(n, m) for n in linear_names)]
    if missing:
        raise EdgeftError(
            f"int8 module {missing[0]!r} names no linear of this model; its linears: {', '.join(sorted(own))}"
        )


def plan_specs(plan: QATPlan, name: str | None = None) -> tuple[ActQuant | None, WeightQuant]:
    """(activation, weight) specs of the linear ``name`` (None: the scheme's own linears), from the torchao configs
    convert will mirror."""
    try:
        act, weight = specs_from_configs(*plan.fake_quant_configs(name))
    except ValueError as e:
        raise EdgeftError(f"QAT scheme {plan.scheme.name}: {e}") from None
    if plan.searched_scales and weight.bits == 4:  # int8 rows keep max|w|: see schemes.WEIGHT_SCALES
        weight = replace(weight, clip_ratios=MSE_RATIOS)
    return act, weight


def embedding_spec(plan: QATPlan) -> WeightQuant | None:
    cfg = plan.embedding_config()
    if cfg is None:
        return None
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    spec = weight_spec(_infer_fake_quantize_configs(cfg)[1])
    if spec.kind == "fp8_int4":
        raise EdgeftError("embedding treatments with fp8 rows are not supported")
    return spec


class ActFakeQuantizer(nn.Module):
    """Callable activation fake quantizer (straight-through); ``spec`` is what the fused kernels read."""

    def __init__(self, spec: ActQuant) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.fake_quant import act_fake_quant

        return act_fake_quant(x, self.spec)

    def extra_repr(self) -> str:
        return repr(self.spec)


def _cache_form(cache: bool | str) -> str | None:
    """prepare's ``cache`` argument as a WeightCache form (None: quantize on every use)."""
    form = {True: "codes", False: None, "off": None}.get(cache, cache)  # type: ignore[call-overload]
    if form not in (None, "codes", "weights"):
        raise EdgeftError(f"QAT weight cache must be codes, weights or off, not {cache!r}")
    return form


class WeightFakeQuantizer(nn.Module):
    """Callable weight fake quantizer (straight-through), caching the quantized weight per parameter version."""

    def __init__(self, spec: WeightQuant, cache: bool | str = True) -> None:
        super().__init__()
        from edgeft.kernels.fake_quant import WeightCache

        self.spec = spec
        form = _cache_form(cache)
        self.cache = WeightCache(form) if form else None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.fake_quant import weight_fake_quant

        return weight_fake_quant(w, self.spec, self.cache)

    def extra_repr(self) -> str:
        return f"{self.spec!r}, cache={self.cache.form if self.cache is not None else None}"


def _learns(spec: WeightQuant, learned: bool) -> bool:
    """Whether a weight on ``spec`` gets learned scales: the plan asks, and it is a 4-bit integer grid (int8 rows
    keep max|w|, as with the clip search)."""
    return learned and spec.kind == "int" and spec.bits == 4


class LearnedWeightFakeQuantizer(nn.Module):
    """Weight fake quantizer with trained group scales (``weight_scale="learned"``, torchao's "range learning"):
    the scales are ``init_scale * exp(log_scale)``: ``init_scale`` (rows, groups, fp32) is the spec's own choice for
    the weight the quantizer is built on, a buffer, and ``log_scale`` a parameter starting at 0 (so the untrained
    model is the PTQ model, bit for bit), trained with the weights by LSQ's gradient
    (:class:`~edgeft.qat.fake_quant.LearnedScaleFakeQuant` is the reference); convert writes the result as torchao
    custom scales (:func:`learned_scales`). A resumed run rebuilds ``init_scale`` from the same starting weights.
    Linear layers hand it to the fused linear Functions (:meth:`fused`), which rebuild fq(W) in the backward and
    return the scales' gradient with the others; ``forward`` (an autograd Function) serves the LM-head loss. Both
    run the kernels of ``kernels/learned_scale.py``; there is no weight cache: the scales change every step.
    ``bank`` (``kernels.learned_scale.ScaleBank``, one per model from :func:`prepare`) computes the scales of all
    the model's quantizers together, once per optimizer step; a quantizer built alone gets a bank of its own."""

    def __init__(self, spec: WeightQuant, weight: torch.Tensor, bank: Any = None) -> None:
        super().__init__()
        from edgeft.kernels.learned_scale import ScaleCache

        self.spec = spec
        init = initial_scale(weight, spec)
        # not in the state dict: checkpoints hold the trainable tensors only, prepare rebuilds this
        self.register_buffer("init_scale", init, persistent=False)
        self.log_scale = nn.Parameter(torch.zeros_like(init))
        self.scales = ScaleCache(bank)  # its entry in the model's bank
        self.scales.track(self.init_scale, self.log_scale, spec, weight.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.learned_scale import learned_weight_fake_quant

        return learned_weight_fake_quant(w, self.log_scale, self.init_scale, self.spec, self.scales)

    def fused(self) -> Any:
        """This quantizer as the fused linear Functions take it (``edgeft.kernels.learned_scale.LearnedWeightFQ``)."""
        from edgeft.kernels.learned_scale import LearnedWeightFQ

        return LearnedWeightFQ(self.spec, self.init_scale, self.log_scale, self.scales)

    def scale(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales convert writes for a weight of ``dtype`` (the forward's, bit for bit)."""
        return learned_scale(self.init_scale, self.log_scale.detach(), self.spec, dtype)

    def extra_repr(self) -> str:
        return f"{self.spec!r}, learned scales {tuple(self.log_scale.shape)}"


class FakeQuantLinear(nn.Linear):
    """A linear layer trained on its deployed grid: F.linear(fq_a(x), fq_w(W), b), sharing the original parameters.

    ``weight_fake_quantizer`` / ``activation_fake_quantizer`` are callables with torchao's attribute names, so code
    that applies a head's fake quantizers itself (the fused cross-entropy path) works unchanged.
    """

    def __init__(
        self,
        linear: nn.Linear,
        act: ActQuant | None,
        weight: WeightQuant,
        cache: bool | str = True,
        learned: bool = False,
        bank: Any = None,
    ) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.activation_fake_quantizer = ActFakeQuantizer(act) if act is not None else None
        self.weight_fake_quantizer: nn.Module = (
            LearnedWeightFakeQuantizer(weight, linear.weight, bank)
            if _learns(weight, learned)
            else WeightFakeQuantizer(weight, cache)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.lora import lora_linear

        return lora_linear(x, [self.edgeft_projection()])[0]

    def edgeft_projection(self) -> Any:
        """What the fused kernels compute for this layer (``edgeft.kernels.lora.projection_of``): the raw weight
        with its fake quantizer, which the linear Function applies in the forward and again in the backward."""
        from edgeft.kernels.fake_quant import WeightFQ
        from edgeft.kernels.lora import Projection

        act = self.activation_fake_quantizer.spec if self.activation_fake_quantizer is not None else None
        wfq = self.weight_fake_quantizer
        if isinstance(wfq, LearnedWeightFakeQuantizer):  # the Functions also return its scales' gradient
            return Projection(self.weight, self.bias, act_quant=act, weight_fq=wfq.fused())
        return Projection(self.weight, self.bias, act_quant=act, weight_fq=WeightFQ(wfq.spec, wfq.cache))

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


class FakeQuantEmbedding(nn.Embedding):
    """An embedding whose looked-up rows are fake-quantized (per-row grid: fq(W)[ids] == fq(W[ids]) exactly)."""

    def __init__(self, emb: nn.Embedding, spec: WeightQuant) -> None:
        if spec.group_size is not None and emb.embedding_dim % spec.group_size:
            raise EdgeftError(f"embedding dim {emb.embedding_dim} is not a multiple of group {spec.group_size}")
        super().__init__(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
            device="meta",
        )
        self.weight = emb.weight
        self.spec = spec

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.fake_quant import rows_fake_quant

        rows = F.embedding(
            ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return rows_fake_quant(rows, self.spec)

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(
            self.num_embeddings,
            self.embedding_dim,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
            device="meta",
        )
        emb.weight = self.weight
        return emb


class MergedFakeQuantLoraLinear(nn.Module):
    """A PEFT LoRA linear whose forward fake-quantizes the merged weight W + s·B·A (see the module docstring).

    It registers the PEFT module's own ``base_layer``, ``lora_A``, ``lora_B`` and ``lora_dropout`` as children
    under the same names, so state-dict keys (checkpoints, adapter saving) are unchanged; the original module is
    kept for :func:`unprepare`.
    """

    def __init__(
        self,
        lora: nn.Module,
        act: ActQuant | None,
        weight: WeightQuant,
        cache: bool | str = True,
        learned: bool = False,
        bank: Any = None,
    ) -> None:
        super().__init__()
        from edgeft.kernels.fake_quant import WeightCache

        if len(lora.active_adapters) != 1:
            raise EdgeftError("QAT with LoRA needs exactly one active adapter")
        self.adapter = lora.active_adapters[0]
        if getattr(lora, "use_dora", {}).get(self.adapter, False) or self.adapter in getattr(lora, "lora_variant", {}):
            raise EdgeftError("QAT with LoRA supports plain LoRA adapters (not DoRA or other variants)")
        if getattr(lora, "fan_in_fan_out", False):
            raise EdgeftError("QAT with LoRA does not support fan_in_fan_out (Conv1D) layers")
        self.base_layer = lora.base_layer
        self.lora_A = lora.lora_A
        self.lora_B = lora.lora_B
        self.lora_dropout = lora.lora_dropout
        self.scaling = float(lora.scaling[self.adapter])
        self.act_spec = act
        self.weight_spec = weight
        # the merged weight changes every step: only the "weights" form keeps it (for the step's other uses)
        self.weight_cache = WeightCache("weights") if _cache_form(cache) == "weights" else None
        self.weight_fake_quantizer = None
        if _learns(weight, learned):
            self.weight_fake_quantizer = LearnedWeightFakeQuantizer(weight, self.merged_weight(), bank)
        object.__setattr__(self, "_peft_module", lora)

    def _adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[self.adapter].weight, self.lora_B[self.adapter].weight

    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A in the base weight's dtype: the weight this layer's forward fake-quantizes and convert writes."""
        from edgeft.kernels.fake_quant import merged_lora_weight

        return merged_lora_weight(self.base_layer.weight, *self._adapters(), self.scaling)

    def edgeft_projection(self) -> Any:
        """The merged, fake-quantized Projection the fused LoRA Functions run (``kernels.lora.projection_of``):
        they build fq(W + s·B·A) from W, A and B in the forward and again in the backward."""
        from edgeft.kernels.fake_quant import WeightFQ
        from edgeft.kernels.lora import Projection

        a, b = self._adapters()
        drop = self.lora_dropout[self.adapter]
        active = isinstance(drop, nn.Dropout) and drop.p > 0 and drop.training
        learned = self.weight_fake_quantizer  # learned scales: the Functions also return their gradient
        fq = learned.fused() if learned is not None else WeightFQ(self.weight_spec, self.weight_cache)
        return Projection(
            self.base_layer.weight,
            self.base_layer.bias,
            a,
            b,
            self.scaling,
            drop if active else None,
            merged=True,
            act_quant=self.act_spec,
            weight_fq=fq,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edgeft.kernels.lora import lora_linear

        return lora_linear(x, [self.edgeft_projection()])[0]


def _set_child(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(
    model: nn.Module,
    scheme_or_preset: str | QATPlan,
    group_size: int | None = None,
    *,
    cache: bool | str = True,
    weight_scale: str = "absmax",
    int8_modules: tuple[str, ...] = (),
) -> list[str]:
    """Insert fake quantization in place; returns the names of the modules it replaced.

    Linears whose input size the group size does not divide stay in float (listed with a ``skip:`` prefix),
    and so does every module convert would not quantize, keeping prepare and convert in step.

    ``cache`` (see ``edgeft.kernels.fake_quant.WeightCache``): ``"codes"`` (``True``, the default) quantizes each
    full fine-tuning weight once per optimizer step and keeps its integer codes; ``"weights"`` keeps the
    fake-quantized weights themselves, LoRA's merged ones included: the fastest, at one quantized copy of the
    linear weights, which is what the trainer picks when it does not checkpoint (activations dominate then);
    ``"off"`` (``False``) re-quantizes on every use. ``weight_scale`` (with a scheme name; a plan carries its own):
    how 4-bit weight groups choose their scale, ``"absmax"`` (torchao's), ``"mse"``, or ``"learned"`` /
    ``"learned-mse"`` (trained parameters, :class:`LearnedWeightFakeQuantizer`; ``schemes.WEIGHT_SCALES``);
    ``int8_modules``: linears (by their own name, e.g. ``"down_proj"``) kept at int8 per output channel.
    """
    plan = (
        scheme_or_preset
        if isinstance(scheme_or_preset, QATPlan)
        else resolve(scheme_or_preset, group_size, weight_scale, int8_modules)
    )
    specs = {False: plan_specs(plan), True: plan_specs(plan, plan.int8_modules[0]) if plan.int8_modules else None}
    emb = embedding_spec(plan)
    learned = plan.learned_scales
    bank = None
    if learned:  # one bank for the model: all its learned scales in one refresh per step
        from edgeft.kernels.learned_scale import ScaleBank

        bank = ScaleBank()
    replaced: list[str] = []

    # LoRA layers first: their base_layer must not also get a fake quantizer of its own.
    lora_names = [n for n, m in model.named_modules() if is_lora_linear(m)]

    def inside_lora(fqn: str) -> bool:
        return any(fqn == n or fqn.startswith(n + ".") for n in lora_names)

    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and not inside_lora(n)]
    check_int8_modules(plan, lora_names + linears)
    for name in lora_names:
        mod = model.get_submodule(name)
        if not _group_ok(mod.base_layer.in_features, plan, name):
            replaced.append(f"skip:{name}")
            continue
        _set_child(model, name, MergedFakeQuantLoraLinear(mod, *specs[plan.is_int8(name)], cache, learned, bank))
        replaced.append(name)

    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not inside_lora(name):
            if not _group_ok(m.in_features, plan, name):
                replaced.append(f"skip:{name}")
                continue
            _set_child(model, name, FakeQuantLinear(m, *specs[plan.is_int8(name)], cache, learned, bank))
            replaced.append(name)
        elif type(m) is nn.Embedding and emb is not None and not inside_lora(name):
            _set_child(model, name, FakeQuantEmbedding(m, emb))
            replaced.append(name)
    model._edgeft_qat_plan = plan.to_dict()  # noqa: SLF001 - read by convert and the trainer
    return replaced


def unprepare(model: nn.Module) -> None:
    """Remove fake quantization, restoring PEFT LoRA modules and plain Linear/Embedding (weights shared)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MergedFakeQuantLoraLinear):
            _set_child(model, name, mod._peft_module)
        elif isinstance(mod, FakeQuantLinear):
            _set_child(model, name, mod.to_linear())
        elif isinstance(mod, FakeQuantEmbedding):
            _set_child(model, name, mod.to_embedding())
    if hasattr(model, "_edgeft_qat_plan"):
        del model._edgeft_qat_plan


def learned_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained group scales of a prepared model's learned-scale linears, by the name each linear has in the
    plain model convert quantizes (PEFT's ``base_model.model.`` dropped), in the dtype convert writes."""
    out = {}
    for name, mod in model.named_modules():
        fq = getattr(mod, "weight_fake_quantizer", None)
        if isinstance(fq, LearnedWeightFakeQuantizer):
            w = mod.base_layer.weight if isinstance(mod, MergedFakeQuantLoraLinear) else mod.weight
            out[name.removeprefix("base_model.model.")] = fq.scale(w.dtype)
    return out


def is_prepared(model: nn.Module) -> bool:
    return hasattr(model, "_edgeft_qat_plan")


def fake_quant_cache_stats(model: nn.Module) -> dict[str, int]:
    """Hits and misses of the weight caches (for tests and the benchmark)."""
    hits = misses = 0
    for m in model.modules():
        c = m.cache if isinstance(m, WeightFakeQuantizer) else getattr(m, "weight_cache", None)
        if isinstance(m, (WeightFakeQuantizer, MergedFakeQuantLoraLinear)) and c is not None:
            hits += c.hits
            misses += c.misses
    return {"hits": hits, "misses": misses}
