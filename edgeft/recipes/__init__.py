"""Training plans: which runs ``edgeft train`` trains, in which order and from what. The pipeline prepares the run
directory and the data, then hands them to the plan that :func:`choose` picks; a plan calls back ``train`` (one
training run into a directory: pipeline's stage) and nothing else.

- :mod:`.finetune`: one fine-tune, with QAT or not; with QAT and the PTQ baseline that learns nothing from it, the
  float baseline is trained after it.
- :mod:`.twin_qat`: edgeft's QAT recipe: the float twin first, then QAT from its weights, distilled from it.

The recipe's settings and their defaults are the ``qat`` section's (:class:`edgeft.config.QATSettings`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("edgeft")

BASELINE = "baseline"  # the float twin's / PTQ baseline's directory inside the run


class TrainRun(Protocol):
    """One training run into ``root`` on ``data``, with fake quantization or not; ``twin``: the trained float twin
    it learns from (starts at and/or distils from, as the config's ``qat`` section says)."""

    def __call__(self, root: Path, data: tuple, qat: bool, twin: Path | None = None) -> None: ...


def choose(cfg: Any):
    """The plan (a module with ``run(cfg, run_dir, data, train, is_main)``) for a resolved config."""
    from . import finetune, twin_qat

    return twin_qat if cfg.qat.from_twin else finetune


def with_prose(cfg: Any, data: tuple, is_main: bool = True) -> tuple:
    """The QAT run's data: the training examples mixed with ``cfg.qat.corpus`` of packaged generic prose, so the
    quantized model follows the float one beyond the user's data (training/distill.py)."""
    if not (cfg.qat.scheme and cfg.qat.corpus):
        return data
    from edgeft.training.distill import corpus_examples

    tokenizer, template, train_ex, eval_ex = data
    prose = corpus_examples(tokenizer, cfg.qat.corpus, len(train_ex), seed=cfg.optim.seed)
    if is_main:
        log.info("QAT data: %d examples + %d chunks of generic prose (--qat-corpus %.2f)", len(train_ex), len(prose),
                 cfg.qat.corpus)
    return (tokenizer, template, train_ex + prose, eval_ex)
