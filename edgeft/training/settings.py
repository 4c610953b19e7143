"""What :func:`edgeft.training.loop.train_loop` is told: a few small frozen settings objects.

The loop's own vocabulary, independent of :class:`edgeft.config.TrainConfig` (whose sections also carry CLI and
run-level concerns: the eval split, epochs, unresolved defaults): the pipeline translates a config into these, so
the loop can be called from a test or a benchmark without a config. Each object groups what one concern of the loop
reads: the data (:class:`TrainData`), the optimisation (:class:`Optimization`), evaluation and early stopping
(:class:`Evaluation`), checkpoints and resume (:class:`Checkpointing`), logging (:class:`Reporting`) and where it
runs (:class:`Placement`). Defaults are the loop's defaults; a field left out behaves as before the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .checkpoint import CheckpointManager
    from .distributed import DistInfo


@dataclass(frozen=True)
class TrainData:
    """The tokenized examples and how they become micro-batches (``batching``: padding_free, padding or packed)."""

    examples: Sequence[dict[str, list[int]]]
    pad_id: int
    eval_examples: Sequence[dict[str, list[int]]] | None = None
    batching: str = "padding_free"
    max_seq_length: int | None = None  # packed rows' length (and the cap of a padded batch)


@dataclass(frozen=True)
class Optimization:
    """The optimizer steps: how many, on what batches, with which optimizer, schedule and weight update.

    ``batch_size`` is per micro-batch and process; ``grad_accum`` micro-batches make one step. ``scale_lr``: the
    learning rate of learned QAT scales; ``bf16_update``: how bf16 trainable tensors are updated (optim.py,
    precision.py); ``keep_masters``: the model ends with its fp32 masters as weights (see train_loop). ``seed``
    decides the data order and the stochastic rounding's draws.
    """

    max_steps: int
    batch_size: int
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    embedding_lr: float | None = None
    scale_lr: float | None = None
    seed: int = 42
    bf16_update: str = "master"
    keep_masters: bool = False


@dataclass(frozen=True)
class Evaluation:
    """Evaluate ``TrainData.eval_examples`` every ``steps`` steps (and at the last); stop after ``patience``
    evaluations without an improvement larger than ``threshold``; ``load_best``: end with the best weights."""

    steps: int | None = None
    patience: int | None = None
    threshold: float = 0.0
    load_best: bool = True


@dataclass(frozen=True)
class Checkpointing:
    """Checkpoints through ``manager`` (None: none) every ``save_steps`` steps, at every new best eval loss and at
    the end; ``resume`` continues from the newest one (without one, training starts at step 0)."""

    manager: CheckpointManager | None = None
    save_steps: int = 0
    resume: bool = False


@dataclass(frozen=True)
class Reporting:
    """Where steps are logged: ``metrics_path`` (JSONL, one line per step), a progress bar or a log line every
    ``logging_steps`` steps titled ``desc``, and ``report_to`` trackers writing under ``log_dir`` with
    ``run_config`` as their hyperparameters."""

    metrics_path: str | Path | None = None
    progress: bool = True
    desc: str = "train"
    logging_steps: int = 10
    report_to: Sequence[str] = ()
    log_dir: Path | None = None
    run_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Placement:
    """Where training runs: ``device``, and with ``dist`` (torchrun) the ``strategy``, "ddp" or "fsdp"."""

    device: str = "cpu"
    dist: DistInfo | None = None
    strategy: str = "ddp"
