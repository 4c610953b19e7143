"""One fine-tune into the run directory: LoRA or full, with QAT when a scheme is given (mixed with prose if
``qat.corpus`` says so). With QAT and ``qat.ptq`` but nothing learned from the twin (``qat.distill`` 0,
``qat.init`` pretrained), the float baseline trains afterwards, independently, into the run's baseline (``baseline/``)
for the BF16/PTQ comparison."""

from __future__ import annotations

from typing import Any

from edgeft.rundir import RunDir

from .common import TrainRun, with_prose


def run(cfg: Any, run_dir: RunDir, data: tuple, train: TrainRun, is_main: bool = True) -> None:
    """Train the plan's runs in order (the order fixes the random draws: keep it)."""
    qat = cfg.qat.scheme is not None
    train(run_dir, with_prose(cfg, data, is_main), qat=qat)
    if qat and cfg.qat.ptq:
        train(run_dir.baseline, data, qat=False)
