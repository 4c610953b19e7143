"""QAT prepare: insert fake quantization that simulates the exact grid convert will write.

Full fine-tuning uses torchao's ``QATConfig(base, step="prepare")``: linears become FakeQuantizedLinear and,
for presets that quantize embeddings, embeddings become FakeQuantizedEmbedding.

LoRA is different, and torchao alone gets it wrong: it fake-quantizes the frozen base weight and then adds
the adapter path in float, but the phone runs the *merged* weight W + s·B·A quantized once. edgeft therefore
replaces each PEFT ``lora.Linear`` with :class:`MergedFakeQuantLoraLinear`, whose forward is
``F.linear(fq_act(x), fq_w(W + s·B·A), b)`` with torchao's own fake quantizers (straight-through estimator),
so the trained grid is the deployed grid. lora_dropout must be 0 under QAT: dropout on the adapter input
cannot be expressed as one merged weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.errors import EdgeftError

from .schemes import QATPlan, resolve


def _torchao():
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return quantize_, QATConfig, _infer_fake_quantize_configs, FakeQuantizerBase


def _is_lora_linear(m: nn.Module) -> bool:
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return False
    return isinstance(m, LoraLinear)


def _group_ok(in_features: int, plan: QATPlan) -> bool:
    return plan.group_size is None or in_features % plan.group_size == 0


class MergedFakeQuantLoraLinear(nn.Module):
    """A PEFT LoRA linear whose forward fake-quantizes the merged weight W + s·B·A.

    It registers the PEFT module's own ``base_layer``, ``lora_A`` and ``lora_B`` as children under the same
    names, so state-dict keys (checkpoints, adapter saving) are unchanged; the original module is kept for
    :func:`unprepare`.
    """

    def __init__(self, lora: nn.Module, act_config: Any, weight_config: Any) -> None:
        super().__init__()
        _, _, _, FakeQuantizerBase = _torchao()
        if len(lora.active_adapters) != 1:
            raise EdgeftError("QAT with LoRA needs exactly one active adapter")
        self.adapter = lora.active_adapters[0]
        drop = lora.lora_dropout[self.adapter]
        if not isinstance(drop, nn.Identity) and getattr(drop, "p", 0.0) > 0:
            raise EdgeftError(
                "lora_dropout must be 0 with QAT: the phone runs the merged weight, which dropout cannot express"
            )
        self.base_layer = lora.base_layer
        self.lora_A = lora.lora_A
        self.lora_B = lora.lora_B
        self.scaling = float(lora.scaling[self.adapter])
        self.fan_in_fan_out = bool(getattr(lora, "fan_in_fan_out", False))
        self.activation_fake_quantizer = FakeQuantizerBase.from_config(act_config) if act_config else None
        self.weight_fake_quantizer = FakeQuantizerBase.from_config(weight_config)
        object.__setattr__(self, "_peft_module", lora)

    def merged_weight(self) -> torch.Tensor:
        """W + s·B·A in the base weight's dtype, computed as PEFT's merge computes it."""
        a = self.lora_A[self.adapter].weight
        b = self.lora_B[self.adapter].weight
        delta = (b @ a) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        w = self.base_layer.weight
        return w + delta.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fake_quantizer(self.merged_weight())
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x)
        return F.linear(x.to(w.dtype), w, self.base_layer.bias)


def _set_child(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(model: nn.Module, scheme_or_preset: str | QATPlan, group_size: int | None = None) -> list[str]:
    """Insert fake quantization in place; returns the names of the modules it replaced.

    Linears whose input size the group size does not divide stay in float (listed with a ``skip:`` prefix),
    and so does every module convert would not quantize, keeping prepare and convert in step.
    """
    quantize_, QATConfig, _, _ = _torchao()
    plan = scheme_or_preset if isinstance(scheme_or_preset, QATPlan) else resolve(scheme_or_preset, group_size)
    act_cfg, w_cfg = plan.fake_quant_configs()
    replaced: list[str] = []

    # LoRA layers first: their base_layer must not also get torchao's own fake quantizer.
    lora_names = [n for n, m in model.named_modules() if _is_lora_linear(m)]
    for name in lora_names:
        mod = model.get_submodule(name)
        if not _group_ok(mod.base_layer.in_features, plan):
            replaced.append(f"skip:{name}")
            continue
        _set_child(model, name, MergedFakeQuantLoraLinear(mod, act_cfg, w_cfg))
        replaced.append(name)

    def linear_filter(m: nn.Module, fqn: str) -> bool:
        if type(m) is not nn.Linear:
            return False
        if any(fqn == n or fqn.startswith(n + ".") for n in lora_names):
            return False
        if not _group_ok(m.in_features, plan):
            replaced.append(f"skip:{fqn}")
            return False
        replaced.append(fqn)
        return True

    quantize_(model, plan.qat_prepare_config(), filter_fn=linear_filter)
    emb = plan.embedding_config()
    if emb is not None:

        def emb_filter(m: nn.Module, fqn: str) -> bool:
            if type(m) is nn.Embedding:
                replaced.append(fqn)
                return True
            return False

        quantize_(model, QATConfig(emb, step="prepare"), filter_fn=emb_filter)
    model._edgeft_qat_plan = plan.to_dict()  # noqa: SLF001 - read by convert and the trainer
    return replaced


def unprepare(model: nn.Module) -> None:
    """Remove fake quantization, restoring PEFT LoRA modules and plain Linear/Embedding (weights shared)."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, MergedFakeQuantLoraLinear):
            _set_child(model, name, mod._peft_module)
        elif isinstance(mod, FakeQuantizedLinear):
            _set_child(model, name, mod.to_linear())
        elif isinstance(mod, FakeQuantizedEmbedding):
            _set_child(model, name, mod.to_embedding())
    if hasattr(model, "_edgeft_qat_plan"):
        del model._edgeft_qat_plan


def is_prepared(model: nn.Module) -> bool:
    return hasattr(model, "_edgeft_qat_plan")
