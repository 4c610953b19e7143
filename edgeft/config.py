"""Typed configuration: one dataclass per run, YAML load/save, CLI-style overrides, resolution of presets.

The fully resolved config is written to ``runs/<name>/config.yaml``; loading that file and training again
reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgeftError


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft). dropout is 0 by default: with QAT the forward is then exactly the deployed
    merged weight (with dropout, qat/prepare.py adds a zero-mean correction during training only)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # also e.g. "all-linear,lm_head,embed_tokens"
    bias: str = "none"  # "none" | "all" | "lora_only"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    modules_to_save: list[str] = field(default_factory=list)  # trained in full next to the adapters


@dataclass
class TrainConfig:
    """Everything ``edgeft train`` needs. ``None`` fields are resolved by :func:`resolve`."""

    model: str = "smollm2-135m"
    data: str = "builtin:tasks"  # builtin:tasks, a .jsonl/.json/.csv/.tsv/.parquet/.txt file, or a hub dataset
    data_split: str = "train"  # split of a hub dataset
    out: str | None = None  # run directory; default runs/<model>-<time>
    mode: str | None = None  # "lora" | "full"; None: the QAT preset's choice, else lora
    lora: LoraSettings = field(default_factory=LoraSettings)
    adapter: str | None = None  # continue training a saved LoRA adapter (PEFT directory or edgeft run)
    load_in_4bit: bool = False  # QLoRA: bitsandbytes NF4 base with double quantization
    load_in_8bit: bool = False
    qat: str | None = None  # scheme or preset name
    qat_group_size: int | None = None
    # how 4-bit weight groups pick their scale (qat.schemes.WEIGHT_SCALES): "absmax" (torchao's), "mse", or
    # "learned" / "learned-mse" (trained with the weights, from absmax / mse)
    qat_weight_scale: str = "absmax"
    # linears (by name, e.g. gate_proj, up_proj) kept at int8 per output channel in an int4 scheme
    qat_int8: list[str] = field(default_factory=list)
    ptq: bool = True  # with --qat: also train the no-QAT twin (BF16 and PTQ baselines for eval)
    # with --qat and the twin: KL weight of distilling the trained twin into the QAT model (1: distillation only,
    # 0: labels only); None: 1.0 when the twin is trained, else 0 (train/distill.py)
    qat_distill: float | None = None
    # which positions' next-token distributions are distilled: "all" (prompts included) or "targets" (the labelled
    # ones: the data's answers and every token of the --qat-corpus prose); the KL's temperature
    qat_distill_positions: str = "all"
    qat_distill_temperature: float = 1.0
    # with --qat and the twin: "baseline" starts QAT from the twin's fine-tuned weights, "pretrained" from the
    # model; None: "baseline" when the twin is trained, else "pretrained"
    qat_init: str | None = None
    # with --qat: share of the QAT run's training examples that are chunks of edgeft's packaged generic prose (the
    # twin trains on the data alone); None: 0.25 when distilling, else 0
    qat_corpus: float | None = None
    # learning rate of the QAT run; None: the run's lr, raised to at least 1e-4 when QAT starts from the twin (a
    # weight must move about a quantization step, ~max|w|/7.5 for int4, to change its integer)
    qat_lr: float | None = None
    # learning rate of learned QAT scales (their logs: lr 1e-3 moves a scale by about 0.1% a step); None: 5e-3
    qat_scale_lr: float | None = None
    # optimizer steps of the QAT run; None: max_steps (the twin, and a run without QAT, train max_steps)
    qat_max_steps: int | None = None
    # data
    chat_template: str | None = None  # registry name (edgeft.data.TEMPLATES); None: the tokenizer's own
    system_prompt: str | None = None  # added to conversations without one
    prompt_template: str | None = None  # merge table columns: "Age {Age}.[[ Fare {Fare}.]]"
    output_column: str | None = None  # with prompt_template: the column to learn
    conversation_extension: int = 1  # merge this many rows into one multi-turn conversation
    max_seq_length: int = 512
    padding_free: bool = True  # flatten micro-batches (no pad tokens); False: right-pad
    packing: bool = False  # pack examples into max_seq_length rows
    eval_split: float = 0.0  # held-out share (<1) or count (>=1) of the data
    eval_steps: int | None = None  # evaluate every N steps (and at the end); None: 10 evaluations with eval_split
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement
    early_stopping_threshold: float = 0.0  # an improvement must beat the best eval loss by more than this
    load_best: bool = True  # with evaluation: the saved model is the best-eval-loss one
    # optimisation
    max_steps: int = 60
    epochs: float | None = None  # if set: max_steps = ceil(epochs * optimizer steps per epoch)
    batch_size: int = 8  # examples (packed rows with --packing) per micro-batch and process
    grad_accum: int = 1
    optim: str = "adamw"  # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit | sgd
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    embedding_lr: float | None = None  # separate LR for embed_tokens/lm_head parameters
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0
    dtype: str | None = None  # "fp32" | "bf16"; None: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # None: cuda if available else cpu
    kernels: str = "auto"  # "auto" | "on" | "off": fused Triton kernels (on GPU by default)
    # "auto": none when the activations fit the GPU (fastest), else "plain" (checkpoints stay on the GPU), else
    # "offload" (checkpoints in pinned host memory; with the kernels); transformers' own without the kernels
    gradient_checkpointing: str = "auto"
    # under torchrun: "ddp" (a replica per GPU), "fsdp" (FSDP2: weights, gradients and optimizer state sharded
    # over the GPUs) or "auto" (FSDP2 when DDP's estimated footprint exceeds half a GPU; see train/fsdp.py)
    distributed: str = "auto"
    seed: int = 42
    # checkpoints and logging
    save_steps: int = 0  # checkpoint every N steps and at the end; 0: no checkpoints
    save_total_limit: int | None = None  # keep the newest K checkpoints (and the best)
    resume: bool = False  # continue the run in `out` from its newest checkpoint
    overwrite: bool = False  # replace an existing run in `out`
    report_to: list[str] = field(default_factory=list)  # "tensorboard", "wandb"
    logging_steps: int = 10  # log-line interval when the progress bar is off
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that may change when resuming: they do not affect what training computes.
RESUME_FREE_KEYS = frozenset({
    "out", "resume", "overwrite", "progress", "threads", "report_to", "logging_steps", "save_steps",
    "save_total_limit",
})


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config minus the keys a resume may change: two runs with equal identities compute the same.

    ``qat_max_steps`` appears only when it differs from ``max_steps``: a run saved before the key existed (or with
    it unset) trained its QAT run for ``max_steps``, so its config and checkpoints still match."""
    out = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS}
    if out.get("qat_max_steps") in (None, out.get("max_steps")):
        out.pop("qat_max_steps", None)
    return out


def identity_defaults() -> dict[str, Any]:
    """Every identity key's default, flattened like :func:`flat_keys` ("lora.r") and in its JSON form: a checkpoint
    written before a key existed lacks it, and matches a current run that leaves the key at this value."""
    return json.loads(json.dumps(flat_keys(identity(TrainConfig()))))


def config_diff(saved: TrainConfig, current: TrainConfig) -> list[str]:
    a, b = flat_keys(identity(saved)), flat_keys(identity(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with dots ("lora.r"): how configs and fingerprints are compared."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


_SCHEDULES = ("cosine", "linear", "constant")
_OPTIMS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's annotation (an int is a float; a comma-separated string is a list)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, str) or (isinstance(value, list) and all(_type_ok(v, item) for v in value))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """A field's annotation in YAML's words ("a whole number or null")."""
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ')}s"
    if args:
        return " or ".join(_type_name(h) for h in args)
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_types(cls: type, d: dict[str, Any], source: str, prefix: str = "") -> None:
    import typing

    hints = typing.get_type_hints(cls)
    for k, v in d.items():
        if not _type_ok(v, hints[k]):
            raise EdgeftError(f"{source}{prefix}{k} must be {_type_name(hints[k])}, not {v!r}")


def from_dict(d: dict[str, Any], source: str = "") -> TrainConfig:
    """Build a config from a mapping (YAML), rejecting unknown keys and wrongly typed values with one line.

    ``source``: the file's name, prefixed to errors."""
    source = f"{source}: " if source else ""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise EdgeftError(f"{source}unknown config keys: {', '.join(unknown)}")
    lora = d.pop("lora", None) or {}
    if not isinstance(lora, dict):
        raise EdgeftError(f"{source}config key 'lora' must be a mapping (r, alpha, dropout, target_modules)")
    lknown = {f.name for f in dataclasses.fields(LoraSettings)}
    if set(lora) - lknown:
        raise EdgeftError(f"{source}unknown lora keys: {', '.join(sorted(set(lora) - lknown))}")
    _check_types(TrainConfig, d, source)
    _check_types(LoraSettings, lora, source, "lora.")
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
    return from_dict(data, str(path))


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def qat_plan(cfg: TrainConfig) -> Any:
    """The run's QAT plan (``edgeft.qat.QATPlan``) from its ``qat*`` settings; None without ``--qat``."""
    if cfg.qat is None:
        return None
    from edgeft.qat import resolve as resolve_qat

    return resolve_qat(cfg.qat, cfg.qat_group_size, cfg.qat_weight_scale, tuple(cfg.qat_int8))


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill defaults that depend on the machine and the QAT preset; validate values."""
    import torch

    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora))
    if isinstance(cfg.qat_int8, str):
        cfg.qat_int8 = [x.strip() for x in cfg.qat_int8.split(",") if x.strip()]
    if cfg.qat_int8 and cfg.qat is None:
        raise EdgeftError("--qat-int8 needs --qat (an int4 scheme)")
    if cfg.qat is not None:
        from edgeft.qat import check_convertible

        plan = qat_plan(cfg)
        check_convertible(plan)  # fail now, not after training
        if cfg.mode is None and plan.full_finetuning is not None:
            cfg.mode = "full" if plan.full_finetuning else "lora"
    if cfg.mode is None:
        cfg.mode = "lora"
    twin = bool(cfg.qat and cfg.ptq)
    if cfg.qat_distill is None:
        cfg.qat_distill = 1.0 if twin else 0.0
    if cfg.qat_init is None:
        cfg.qat_init = "baseline" if twin else "pretrained"
    if cfg.qat_corpus is None:
        cfg.qat_corpus = 0.25 if cfg.qat_distill > 0 else 0.0
    if not 0.0 <= cfg.qat_corpus < 1.0:
        raise EdgeftError(f"qat_corpus must be in [0, 1) (a share of the training examples), not {cfg.qat_corpus}")
    if cfg.qat_corpus > 0 and not cfg.qat:
        raise EdgeftError("--qat-corpus mixes generic prose into a QAT run: it needs --qat")
    if not 0.0 <= cfg.qat_distill <= 1.0:
        raise EdgeftError(f"qat_distill must be in [0, 1] (the KL weight), not {cfg.qat_distill}")
    if cfg.qat_distill_positions not in ("all", "targets"):
        raise EdgeftError(f"qat_distill_positions must be all or targets, not {cfg.qat_distill_positions!r}")
    if not cfg.qat_distill_temperature > 0:
        raise EdgeftError(f"qat_distill_temperature must be positive, not {cfg.qat_distill_temperature}")
    if cfg.qat_init not in ("pretrained", "baseline"):
        raise EdgeftError(f"qat_init must be pretrained or baseline, not {cfg.qat_init!r}")
    if (cfg.qat_distill > 0 or cfg.qat_init == "baseline") and not twin:
        raise EdgeftError("--qat-distill and --qat-init baseline learn from the float twin: they need --qat and "
                          "the baseline (drop --no-ptq)")
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
    if not cfg.lr > 0:  # before qat_lr, which defaults to it
        raise EdgeftError(f"lr must be positive, not {cfg.lr}")
    if cfg.qat_lr is None:
        cfg.qat_lr = max(cfg.lr, 1e-4) if (cfg.qat and cfg.qat_init == "baseline") else cfg.lr
    if not cfg.qat_lr > 0:
        raise EdgeftError(f"qat_lr must be positive, not {cfg.qat_lr}")
    if cfg.qat_scale_lr is not None and not cfg.qat_weight_scale.startswith("learned"):
        raise EdgeftError("--qat-scale-lr is the learning rate of learned scales: it needs --qat-weight-scale learned")
    if cfg.qat_scale_lr is None and cfg.qat_weight_scale.startswith("learned"):
        cfg.qat_scale_lr = 5e-3
    if cfg.qat_scale_lr is not None and cfg.qat_scale_lr <= 0:
        raise EdgeftError("qat_scale_lr must be positive")
    if cfg.schedule not in _SCHEDULES:
        raise EdgeftError(f"schedule must be one of {', '.join(_SCHEDULES)}, not {cfg.schedule!r}")
    if cfg.kernels not in ("auto", "on", "off"):
        raise EdgeftError(f"kernels must be auto, on or off, not {cfg.kernels!r}")
    if cfg.gradient_checkpointing not in ("auto", "off", "plain", "offload"):
        raise EdgeftError(f"gradient_checkpointing must be auto, off, plain or offload, not {cfg.gradient_checkpointing!r}")
    if cfg.distributed not in ("auto", "ddp", "fsdp"):
        raise EdgeftError(f"distributed must be auto, ddp or fsdp, not {cfg.distributed!r}")
    if cfg.distributed == "fsdp":
        from edgeft.training.fsdp import check_supported

        check_supported(cfg)
    for name in ("max_steps", "batch_size", "grad_accum", "max_seq_length"):
        if getattr(cfg, name) < 1:
            raise EdgeftError(f"{name} must be at least 1")
    if cfg.qat_max_steps is not None:
        if cfg.qat_max_steps < 1:
            raise EdgeftError("qat_max_steps must be at least 1")
        if not cfg.qat and cfg.qat_max_steps != cfg.max_steps:
            raise EdgeftError("--qat-max-steps sets the QAT run's steps: it needs --qat")
    if not 0 <= cfg.warmup_ratio < 1:
        raise EdgeftError("warmup_ratio must be in [0, 1)")
    if cfg.optim not in _OPTIMS:
        raise EdgeftError(f"optim must be one of {', '.join(_OPTIMS)}, not {cfg.optim!r}")
    if cfg.chat_template is not None:
        from edgeft.data.templates import get_template

        get_template(cfg.chat_template)
    if cfg.lora.bias not in ("none", "all", "lora_only"):
        raise EdgeftError(f"lora bias must be none, all or lora_only, not {cfg.lora.bias!r}")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise EdgeftError("choose one of --load-in-4bit and --load-in-8bit")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.mode != "lora":
        raise EdgeftError("4-/8-bit loading trains LoRA adapters on a frozen quantized base; it cannot do full "
                          "fine-tuning (drop --full or the QAT preset that asks for it)")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.qat:
        raise EdgeftError("--qat needs a float base: QAT fake-quantizes the merged float weight, which a "
                          "bitsandbytes-quantized base does not have")
    if cfg.adapter and cfg.mode != "lora":
        raise EdgeftError("--adapter continues a LoRA adapter; it needs LoRA mode")
    if cfg.conversation_extension < 1:
        raise EdgeftError("conversation_extension must be at least 1")
    if not cfg.eval_split >= 0 or (cfg.eval_split >= 1 and cfg.eval_split != int(cfg.eval_split)):
        raise EdgeftError(f"eval_split must be a share below 1 or a whole count of examples, not {cfg.eval_split}")
    for name in ("eval_steps", "early_stopping_patience", "save_total_limit", "warmup_steps", "epochs"):
        v = getattr(cfg, name)
        if v is not None and v < (0 if name == "warmup_steps" else 1 if name != "epochs" else 1e-9):
            raise EdgeftError(f"{name} must be positive")
    if cfg.save_steps < 0:
        raise EdgeftError("save_steps must be >= 0 (0: no checkpoints)")
    if cfg.early_stopping_patience and cfg.eval_split <= 0:
        raise EdgeftError("early stopping needs an evaluation set: pass --eval-split")
    if cfg.embedding_lr is not None and cfg.embedding_lr <= 0:
        raise EdgeftError("embedding_lr must be positive")
    if isinstance(cfg.report_to, str):
        cfg.report_to = [x.strip() for x in cfg.report_to.split(",") if x.strip()]
    from edgeft.training.report import check_report_to

    check_report_to(cfg.report_to)
    return cfg
