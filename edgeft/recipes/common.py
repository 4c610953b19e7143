"""What every plan shares: the ``train`` callback's shape (one training run into a variant of the run directory) and
the QAT run's data (the user's examples mixed with generic prose). The plans import this module, never the package,
so the package may import the plans without an import cycle."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from edgeft.rundir import Variant

log = logging.getLogger("edgeft")


class TrainRun(Protocol):
    """One training run into ``root`` on ``data``, with fake quantization or not; ``twin``: the trained float twin
    it learns from (starts at and/or distils from, as the config's ``qat`` section says)."""

    def __call__(self, root: Variant, data: tuple, qat: bool, twin: Variant | None = None) -> None: ...


def with_prose(cfg: Any, data: tuple, is_main: bool = True) -> tuple:
    """The QAT run's data: the training examples mixed with ``cfg.qat.corpus`` of packaged generic prose, so the
    quantized model follows the float one beyond the user's data (training/distill.py)."""
    if not (cfg.qat.scheme and cfg.qat.corpus):
        return data
    from edgeft.training.distill import corpus_examples

    tokenizer, template, train_ex, eval_ex = data
    prose = corpus_examples(tokenizer, cfg.qat.corpus, len(train_ex), seed=cfg.optim.seed)
    if is_main:
        log.info(
            "QAT data: %d examples + %d chunks of generic prose (--qat-corpus %.2f)",
            len(train_ex),
            len(prose),
            cfg.qat.corpus,
        )
    return (tokenizer, template, train_ex + prose, eval_ex)
