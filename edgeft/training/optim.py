"""Optimizers and learning-rate schedules.

Parameter groups: weight decay only on matrices (never on norms and biases, 1-D tensors), and a separate, usually
2-10x smaller learning rate for embedding and LM-head weights when ``embedding_lr`` is given (training them at the
adapters' rate destroys the pretrained vocabulary geometry). Learned QAT scales (log-space parameters named
``*.weight_fake_quantizer.log_scale``) get a group of their own: their learning rate ``scale_lr``, no weight decay
(decay would pull every scale towards 1). Optimizers: AdamW (fused), bitsandbytes' 8-bit
and paged AdamW variants (they keep the same groups), and SGD.

bf16 (or fp16) trainable tensors are updated through fp32 master weights (precision.py: ``bf16_update="master"``,
the default; any optimizer above runs on the masters, and each bf16 weight is its master rounded stochastically);
for benchmarks, ``"master-nearest"`` rounds to nearest instead (the forward then lags the masters) and ``"pure"`` is
the plain optimizer on the bf16 tensors, which rounds most updates of about the learning rate away.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeft.errors import EdgeftError

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")
SCHEDULES = ("cosine", "linear", "constant")  # lr_factor's shapes after warmup
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out", "output_embeddings")
QAT_SCALE_SUFFIX = ".weight_fake_quantizer.log_scale"  # edgeft.qat.prepare.LearnedWeightFakeQuantizer


def is_embedding_param(name: str) -> bool:
    return any(part in name for part in EMBEDDING_NAMES)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, embedding_lr: float | None = None, scale_lr: float | None = None
) -> list[dict]:
    """Trainable parameters in up to four groups, (decay | no decay) x (body | embeddings), and learned QAT scales
    in a fifth; empty groups dropped."""
    groups: dict[tuple[bool, bool], list] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    scales: list = []
    scale_names: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(QAT_SCALE_SUFFIX):
            scales.append(p)
            scale_names.append(name)
            continue
        key = (p.ndim >= 2, embedding_lr is not None and is_embedding_param(name))
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    out = []
    for decay, emb in [(True, False), (False, False), (True, True), (False, True)]:
        if (decay, emb) in groups:
            out.append(
                {
                    "params": groups[(decay, emb)],
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr": embedding_lr if emb else lr,
                    "names": names[(decay, emb)],
                }
            )
    if scales:
        out.append(
            {
                "params": scales,
                "weight_decay": 0.0,
                "lr": scale_lr if scale_lr is not None else lr,
                "names": scale_names,
            }
        )
    return out


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    optim: str = "adamw",
    embedding_lr: float | None = None,
    scale_lr: float | None = None,
    bf16_update: str = "master",
    seed: int = 0,
) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters (see the module docstring for the groups and
    ``bf16_update``); fp32 parameters only: the plain optimizer whatever ``bf16_update`` says. ``seed`` keys the
    stochastic rounding of bf16 weights from their masters (with the step: nothing to checkpoint)."""
    from .precision import BF16_UPDATES, MasterWeights, needs_masters

    groups = param_groups(model, lr, weight_decay, embedding_lr, scale_lr)
    if not groups:
        raise EdgeftError("the model has no trainable parameters")
    for g in groups:
        g.pop("names")
    if bf16_update not in BF16_UPDATES:
        raise EdgeftError(f"bf16_update must be one of {', '.join(BF16_UPDATES)}, not {bf16_update!r}")
    if not needs_masters([p for g in groups for p in g["params"]]) or bf16_update == "pure":
        return _optimizer(groups, lr, optim)
    rounding = "nearest" if bf16_update == "master-nearest" else "stochastic"
    return MasterWeights(groups, lambda gs: _optimizer(gs, lr, optim), rounding=rounding, seed=seed)


def precision_record(opt: torch.optim.Optimizer, dtype: str | None = None) -> dict:
    """What a run's weight update was, for edgeft.json: the update rule and the optimizer behind it."""
    from .precision import MasterWeights

    if isinstance(opt, MasterWeights):
        n = sum(1 for g in opt.param_groups for p in g["params"] if p.dtype != torch.float32)
        return {
            "dtype": dtype,
            "bf16_update": "master",
            "rounding": opt.rounding,
            "optimizer": type(opt._ensure()).__name__,
            "master_tensors": n,
            "master_bytes": opt.master_bytes(),
        }
    low = any(p.dtype != torch.float32 for g in opt.param_groups for p in g["params"])
    update = "fp32" if not low else ("stochastic" if getattr(opt, "bf16_stochastic_round", False) else "pure")
    return {"dtype": dtype, "bf16_update": update, "optimizer": type(opt).__name__}


def _optimizer(groups: list[dict], lr: float, optim: str) -> torch.optim.Optimizer:
    if optim == "adamw":
        # fused on every device: one kernel per step, and CPU runs take the same path as GPU runs (a fused step
        # does not bump parameter versions; caches keyed on them once went stale on the GPU only)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    if optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.0)
    if optim in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise EdgeftError(f"--optim {optim} needs bitsandbytes: pip install 'edgeft[bnb]'") from None
        cls = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw": bnb.optim.PagedAdamW,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        }[optim]
        return cls(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise EdgeftError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")


def warmup_steps_for(total: int, warmup_ratio: float, warmup_steps: int | None) -> int:
    """Warmup length: explicit steps win over the ratio of the total."""
    if warmup_steps is not None:
        return min(int(warmup_steps), total)
    return int(round(warmup_ratio * total))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, total: int, warmup: int, schedule: str):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, schedule))
