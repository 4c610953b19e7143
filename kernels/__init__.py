"""Fused Triton kernels for training: one file per op (Triton kernel + PyTorch reference + autograd.Function).

Public API:
- ``patch(model, spec, **flags) -> list[str]`` / ``unpatch(model)``: apply the kernels to a transformers model,
  also inside PEFT, as its family's ``KernelSpec`` says (the table of families is ``edgeft.arch``); see patch.py.
- ``lm_head_loss(hidden, weight, labels, softcap=None) -> (loss_sum, n_targets)``: chunked fused LM head +
  cross-entropy; ``causal_lm_loss(model, input_ids, labels, ...)`` wraps it for a whole causal LM.
- ``lm_head_kl_loss(hidden, weight, teacher_hidden, teacher_weight, labels, mask, T, ...) -> (kl_sum, ce_sum)``:
  chunked fused student and teacher heads + distillation KL (and CE), no logits (QAT distillation).
- the ops themselves: ``rms_norm``, ``rope_``, ``swiglu``, ``geglu``, ``lora_linear``, ``lora_mlp``,
  ``varlen_attention``, ``checkpoint_layer``.

Importing this package has no side effects; Triton is imported only if installed (CPU runs use the references).
"""

from .attention import PackedBatch, packed_batch_from_position_ids, varlen_attention
from .checkpoint import checkpoint_layer
from .cross_entropy import lm_head_loss
from .fused_linear_kl import lm_head_kl_loss
from .geglu import geglu
from .lora import Projection, lora_linear, lora_mlp, projection_of
from .patch import KernelSpec, causal_lm_loss, decoder_stack, patch, transformers_model, unpatch
from .rms_norm import rms_norm
from .rope import rope_
from .swiglu import swiglu

__all__ = [
    "KernelSpec",
    "PackedBatch",
    "Projection",
    "causal_lm_loss",
    "checkpoint_layer",
    "decoder_stack",
    "geglu",
    "lm_head_kl_loss",
    "lm_head_loss",
    "lora_linear",
    "lora_mlp",
    "packed_batch_from_position_ids",
    "patch",
    "projection_of",
    "rms_norm",
    "rope_",
    "swiglu",
    "transformers_model",
    "unpatch",
    "varlen_attention",
]
