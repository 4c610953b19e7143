"""edgeft's QAT recipe: train the float twin, then QAT from its weights, distilled from it.

1. The twin: the same fine-tune without fake quantization, into ``baseline/`` (it is also the BF16 and PTQ
   baseline that QAT is measured against).
2. QAT into the run directory, starting from the twin's fine-tuned weights (``qat.init`` baseline: LoRA continues
   its adapter, full fine-tuning loads its model), learning to reproduce its next-token distributions
   (``qat.distill``: the KL weight; ``qat.distill_positions``, ``qat.distill_temperature``) on the user's data mixed
   with generic prose or the twin's own generations (``qat.corpus``, ``qat.corpus_source``: sampled once after
   the twin trains, into ``twin_generations.json``), at a learning rate floored so weights cross int4 steps
   (``qat.lr``), for ``qat.max_steps`` (or ``qat.steps_ratio`` times the twin's steps).

The defaults of these settings are the recipe's, filled by :meth:`edgeft.config.QATSettings.resolved`; the twin
(a plain fine-tune) ignores them all.
"""

from __future__ import annotations

from typing import Any

from edgeft.rundir import RunDir

from .common import TrainRun, with_prose


def run(cfg: Any, run_dir: RunDir, data: tuple, train: TrainRun, is_main: bool = True) -> None:
    """Train the twin, then the QAT run from it (the order fixes the random draws: keep it)."""
    twin = run_dir.baseline
    train(twin, data, qat=False)
    train(run_dir, with_prose(cfg, data, is_main, twin=twin, run=run_dir), qat=True, twin=twin)
