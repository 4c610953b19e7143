"""Training plans: which runs ``edgeft train`` trains, in which order and from what. The pipeline prepares the run
directory (a :class:`edgeft.rundir.RunDir`) and the data, then hands them to the plan that :func:`choose` picks; a
plan calls back ``train`` (one training run into a variant of the run: pipeline's stage) and nothing else.

- :mod:`.finetune`: one fine-tune, with QAT or not; with QAT and the PTQ baseline that learns nothing from it, the
  float baseline is trained after it.
- :mod:`.twin_qat`: edgeft's QAT recipe: the float twin first, then QAT from its weights, distilled from it.

The recipe's settings and their defaults are the ``qat`` section's (:class:`edgeft.config.QATSettings`).
"""

from __future__ import annotations

from typing import Any

from .common import TrainRun, with_prose

__all__ = ["TrainRun", "choose", "with_prose"]


def choose(cfg: Any):
    """The plan (a module with ``run(cfg, run_dir, data, train, is_main)``) for a resolved config."""
    from . import finetune, twin_qat

    return twin_qat if cfg.qat.from_twin else finetune
