"""Typed configuration: one dataclass per run, YAML load/save, CLI-style overrides, resolution of presets.

The fully resolved config is written to ``runs/<name>/config.yaml``; loading that file and training again
reproduces the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgeftError


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). lora_dropout is 0 by default: QAT needs it (merged-weight fake-quant)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig:
    """Everything ``edgeft train`` needs. ``None`` fields are resolved by :func:`resolve`."""

    model: str = "smollm2-135m"
    data: str = "builtin:tasks"
    out: str | None = None  # run directory; default runs/<model>-<time>
    mode: str | None = None  # "lora" | "full"; None: the QAT preset's choice, else lora
    lora: LoraSettings = field(default_factory=LoraSettings)
    qat: str | None = None  # scheme or preset name
    qat_group_size: int | None = None
    ptq: bool = True  # with --qat: also train the no-QAT twin (BF16 and PTQ baselines for eval)
    max_steps: int = 60
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_seq_length: int = 512
    dtype: str | None = None  # "fp32" | "bf16"; None: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None: cuda if available else cpu
    kernels: str = "auto"  # "auto" | "on" | "off": fused Triton kernels (on GPU by default)
    seed: int = 42
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCHEDULES = ("cosine", "linear", "constant")


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a config from a mapping (YAML), rejecting unknown keys with one line."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise EdgeftError(f"unknown config keys: {', '.join(unknown)}")
    lora = d.pop("lora", None) or {}
    if not isinstance(lora, dict):
        raise EdgeftError("config key 'lora' must be a mapping (r, alpha, dropout, target_modules)")
    lknown = {f.name for f in dataclasses.fields(LoraSettings)}
    if set(lora) - lknown:
        raise EdgeftError(f"unknown lora keys: {', '.join(sorted(set(lora) - lknown))}")
    return TrainConfig(lora=LoraSettings(**lora), **d)


def load_yaml(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EdgeftError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgeftError(f"{path}: expected a mapping of config keys")
    return from_dict(data)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill defaults that depend on the machine and the QAT preset; validate values."""
    import torch

    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora))
    if cfg.qat is not None:
        from edgeft.qat import check_convertible, resolve as resolve_qat

        plan = resolve_qat(cfg.qat, cfg.qat_group_size)
        check_convertible(plan)  # fail now, not after training
        if cfg.mode is None and plan.full_finetuning is not None:
            cfg.mode = "full" if plan.full_finetuning else "lora"
    if cfg.mode is None:
        cfg.mode = "lora"
    if cfg.mode not in ("lora", "full"):
        raise EdgeftError(f"mode must be 'lora' or 'full', not {cfg.mode!r}")
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype is None:
        cfg.dtype = "bf16" if cfg.device.startswith("cuda") else "fp32"
    if cfg.dtype not in ("fp32", "bf16"):
        raise EdgeftError(f"dtype must be fp32 or bf16, not {cfg.dtype!r}")
    if cfg.lr is None:
        cfg.lr = 2e-4 if cfg.mode == "lora" else 2e-5
    if cfg.schedule not in _SCHEDULES:
        raise EdgeftError(f"schedule must be one of {', '.join(_SCHEDULES)}, not {cfg.schedule!r}")
    if cfg.kernels not in ("auto", "on", "off"):
        raise EdgeftError(f"kernels must be auto, on or off, not {cfg.kernels!r}")
    for name in ("max_steps", "batch_size", "grad_accum", "max_seq_length"):
        if getattr(cfg, name) < 1:
            raise EdgeftError(f"{name} must be at least 1")
    if not 0 <= cfg.warmup_ratio < 1:
        raise EdgeftError("warmup_ratio must be in [0, 1)")
    if cfg.qat and cfg.mode == "lora" and cfg.lora.dropout > 0:
        raise EdgeftError("lora dropout must be 0 with --qat: the phone runs the merged weight, which dropout cannot express")
    return cfg
