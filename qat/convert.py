"""QAT convert and the PTQ baseline: real torchao quantized tensors, saved as an HF-loadable directory.

``convert`` removes fake quantization (merging LoRA adapters into the base weights first), then applies the
scheme's torchao config, which computes the same scales and integers the last fake-quant forward used. The merge
is edgeft's own (``fake_quant.merge_lora_weight``: fp32, summed over the rank in a fixed order, rounded once to the
base dtype), the very weight a QAT LoRA layer fake-quantizes in its forward, rather than PEFT's matmul-based merge,
whose last bit depends on the matmul library: so the integers convert writes are the ones training saw. Convert
the model in the dtype it trained in (before any ``.float()``): torchao computes bf16 scales for a bf16 weight, as
the fake quantizer did. The PTQ baseline is the same ``quantize`` applied to a model trained without QAT. With a
searched weight scale (``weight_scale="mse"``) torchao's handlers get edgeft's scales as custom scales, so that too
is what the fake quantizer chose; learned scales (``weight_scale="learned"``, :func:`edgeft.qat.learned_scales` of
the prepared model, saved with the run as ``qat_scales.safetensors``) go the same way, exactly as trained.

The converted directory is what every exporter reads: ``config.json`` (with a torchao
``quantization_config``), ``model.safetensors`` (torchao's flattened tensor-subclass format, no pickle),
the tokenizer, and ``scheme.json`` (the QAT plan).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir
from edgeft.rundir import SCHEME_FILE, is_converted, read_scheme, scheme_path

from .prepare import _group_ok, check_int8_modules, is_prepared, learned_scales, unprepare
from .schemes import QATPlan, resolve


def check_convertible(plan: QATPlan) -> None:
    """Fail early (before training) when this machine cannot convert the scheme."""
    if plan.scheme.cuda_convert_only and not torch.cuda.is_available():
        raise EdgeftError(
            f"QAT scheme {plan.scheme.name} converts only on a CUDA GPU (torchao's fp8/int4 kernels); "
            "this machine has none: choose int8-int4, int4 or int8, or train on a GPU"
        )


def _untie_if_needed(model: nn.Module, quantize_head: bool, quantize_embedding: bool) -> None:
    """Quantized embeddings and lm_head get different grids, so a tied weight is split in two."""
    cfg = getattr(model, "config", None)
    if not (cfg is not None and getattr(cfg, "tie_word_embeddings", False)):
        return
    if not (quantize_head or quantize_embedding):
        return
    head = model.get_output_embeddings()
    if head is None:
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = False


def quantize(model: nn.Module, plan: QATPlan | str, scales: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Apply the plan's torchao configs in place (the PTQ step). Returns a record of what was quantized.

    ``scales``: trained group scales by linear name (learned-scale QAT); those linears are written on them, the
    others on the plan's own rule."""
    from torchao.quantization import quantize_

    plan = resolve(plan) if isinstance(plan, str) else plan
    check_convertible(plan)
    all_linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    check_int8_modules(plan, all_linears)
    linears = [n for n in all_linears if _group_ok(model.get_submodule(n).in_features, plan, n)]
    skipped = [n for n in all_linears if n not in set(linears)]
    head_name = _output_name(model)
    _untie_if_needed(model, head_name in linears, plan.embedding is not None)
    model.requires_grad_(False)
    for int8 in (False, True):  # the scheme's grid, then the linears kept at int8 (their own torchao config)
        names = [n for n in linears if plan.is_int8(n) == int8]
        if not names:
            continue
        own = int8 or not (plan.searched_scales or set(names) & set(scales or ()))
        if own:  # torchao's scales (searched and learned scales are for the 4-bit grid only)
            lin_set = set(names)
            quantize_(
                model,
                plan.linear_config(names[0]),
                filter_fn=lambda m, fqn, lin_set=lin_set: type(m) is nn.Linear and fqn in lin_set,
            )
        else:
            _quantize_with_scales(model, plan, names, scales or {})
    embeddings: list[str] = []
    emb_cfg = plan.embedding_config()
    if emb_cfg is not None:
        embeddings = [n for n, m in model.named_modules() if type(m) is nn.Embedding]
        quantize_(model, emb_cfg, filter_fn=lambda m, fqn: type(m) is nn.Embedding)
    return {
        "plan": plan.to_dict(),
        "linears": linears,
        "skipped": skipped,
        "embeddings": embeddings,
        "int8_linears": [n for n in linears if plan.is_int8(n)],
        "learned_scales": sorted(n for n in linears if n in (scales or {}) and not plan.is_int8(n)),
    }


def _quantize_with_scales(
    model: nn.Module, plan: QATPlan, linears: list[str], learned: dict[str, torch.Tensor]
) -> None:
    """The plan's torchao config applied with edgeft's scales: the trained ones (``learned``, by name) or those the
    fake quantizer chooses (``fake_quant.int_weight_ref`` on the same weight: the clip search, or max|w|), passed to
    torchao's own handler as custom scales, so the integers torchao rounds are the ones training saw."""
    import copy

    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    from .fake_quant import int_weight_ref
    from .prepare import plan_specs

    cfg = copy.deepcopy(plan.linear_config(linears[0]))  # the linears share one config (quantize groups them)
    cfg.intx_choose_qparams_algorithm = None  # torchao: custom scales replace its choice of qparams
    handler = _QUANTIZE_CONFIG_HANDLER[type(cfg)]
    spec = plan_specs(plan, linears[0])[1]
    for name in linears:
        mod = model.get_submodule(name)
        block = spec.group_size or mod.in_features
        if name in learned:
            scale = learned[name].to(mod.weight.device)
            if scale.shape != (mod.out_features, mod.in_features // block):
                raise EdgeftError(
                    f"learned scales of {name} have shape {tuple(scale.shape)}, not "
                    f"{(mod.out_features, mod.in_features // block)}"
                )
        else:
            _, _, scale = int_weight_ref(mod.weight.detach(), spec, return_codes=True)
        scale = scale.reshape(mod.out_features, mod.in_features // block)
        new = handler(mod, cfg, custom_scale=scale, custom_zero_point=torch.zeros_like(scale, dtype=torch.int8))
        if new is not mod:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


def _output_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for n, m in model.named_modules():
        if m is head:
            return n
    return None


def merge_lora(model: nn.Module) -> nn.Module:
    """Return the plain transformers model: PEFT adapters merged into the base weights (W + s·B·A).

    Plain single-adapter LoRA linears take edgeft's deterministic merge (the weight QAT fake-quantized); anything
    else (DoRA, several adapters, Conv1D) PEFT's own merge.
    """
    try:
        from peft import PeftModel
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    from edgeft.kernels.fake_quant import merged_lora_weight
    from edgeft.kernels.lora import is_lora_linear

    for _, mod in model.named_modules():
        if not is_lora_linear(mod) or mod.merged:
            continue
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        plain = (
            len(active) == 1
            and not getattr(mod, "fan_in_fan_out", False)
            and not getattr(mod, "use_dora", {}).get(active[0], False)
            and active[0] not in getattr(mod, "lora_variant", {})
        )
        if not plain or mod.disable_adapters:
            if active and not mod.disable_adapters:
                mod.merge(adapter_names=active)
            continue
        name = active[0]
        w = mod.base_layer.weight
        with torch.no_grad():
            w.copy_(merged_lora_weight(w, mod.lora_A[name].weight, mod.lora_B[name].weight, mod.scaling[name]))
    return model.unload()


def convert(
    model: nn.Module, plan: QATPlan | str | None = None, scales: dict[str, torch.Tensor] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Turn a QAT-prepared (or plain trained) model into real quantized tensors.

    Returns the converted transformers model (PEFT unwrapped) and the quantization record. Learned scales: a
    prepared model's own (:func:`~edgeft.qat.learned_scales`), else ``scales`` (by linear name, as saved).
    """
    if plan is None:
        if not is_prepared(model):
            raise EdgeftError("convert needs a QAT-prepared model or an explicit scheme")
        plan = QATPlan.from_dict(model._edgeft_qat_plan)
    plan = resolve(plan) if isinstance(plan, str) else plan
    if is_prepared(model):
        scales = {**(scales or {}), **learned_scales(model)}
        unprepare(model)  # LoRA layers back to PEFT's; merge_lora applies the merge their forward quantized
    model = merge_lora(model)
    model.eval()
    record = quantize(model, plan, scales)
    return model, record


def _torchao_hf_config(record: dict[str, Any]) -> dict[str, Any]:
    """An HF ``quantization_config`` naming exactly the modules that were quantized."""
    from collections import OrderedDict

    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    plan = QATPlan.from_dict(record["plan"])
    mapping: OrderedDict[str, Any] = OrderedDict()
    for n in record["linears"]:
        mapping[n] = plan.linear_config(n)
    emb = plan.embedding_config()
    for n in record["embeddings"]:
        mapping[n] = emb
    return TorchAoConfig(FqnToConfig(mapping), include_input_output_embeddings=bool(record["embeddings"])).to_dict()


def write_converted(model: nn.Module, tokenizer: Any, record: dict[str, Any], out_dir: Path) -> None:
    """Write the converted model into an existing directory (not atomic: see :func:`save_converted`).

    torchao tensors go through torchao's safetensors flattening (transformers 5.24's own ``save_pretrained``
    cannot save a torchao-loaded model), with a ``quantization_config`` in config.json so that
    ``from_pretrained`` rebuilds the same tensors.
    """
    if record.get("plan") is None:  # an unquantized model (a run without QAT): plain safetensors, no torchao needed
        model.save_pretrained(out_dir)
    else:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        sd = dict(model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            head = _output_name(model)
            if head:
                sd.pop(f"{head}.weight", None)
        flat, metadata = flatten_tensor_state_dict(sd)
        flat = {k: v.contiguous() for k, v in flat.items()}
        save_file(flat, str(out_dir / "model.safetensors"), metadata=metadata)
        cfg = model.config
        had = getattr(cfg, "quantization_config", None)
        cfg.quantization_config = _torchao_hf_config(record)
        try:
            cfg.save_pretrained(out_dir)
        finally:
            if had is None:
                del cfg.quantization_config
            else:
                cfg.quantization_config = had
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    scheme_path(out_dir).write_text(json.dumps(record, indent=2) + "\n")


def save_converted(model: nn.Module, tokenizer: Any, record: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write the converted model atomically as an HF directory transformers can reload."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_converted(model, tokenizer, record, tmp)
    return out_dir


def load_converted(path: str | os.PathLike) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a converted directory: (model with torchao tensors, tokenizer, quantization record)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not is_converted(path):
        raise EdgeftError(f"{path} is not a converted model directory (no {SCHEME_FILE})")
    import torchao  # noqa: F401  (registers the tensor subclasses)

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    _quantized_outputs_to_float32(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    record = read_scheme(path)
    return model, tokenizer, record


def _quantized_outputs_to_float32(model: nn.Module) -> None:
    """A model trained (and so converted) in bf16 keeps bf16 in its torchao weights, which then meet fp32
    activations. The integers stay; the scales widen to fp32 (exact) and the weights dequantize to fp32."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, IntxUnpackedToInt8Tensor) and w.dtype != torch.float32:
            zp = w.zero_point if w.zero_point.dtype == torch.int8 else w.zero_point.float()
            mod.weight = nn.Parameter(
                IntxUnpackedToInt8Tensor(
                    w.qdata, w.scale.float(), zp, w.target_dtype, w.block_size, torch.float32, w.activation_quantization
                ),
                requires_grad=False,
            )
