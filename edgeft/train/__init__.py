"""Training: the loop, optimizer and schedules, plots.

``edgeft.train`` is both this package and the API verb ``edgeft.train(cfg)``: importing a subpackage binds
it on its parent, which would shadow the verb, so the package itself is callable and forwards to
:func:`edgeft.pipeline.train`.
"""

import sys
import types
from typing import Any

from .loop import backward_window, lm_loss_sum, train_loop
from .optim import build_optimizer, build_scheduler, lr_factor
from .plots import plot_loss, read_metrics

__all__ = [
    "backward_window", "build_optimizer", "build_scheduler", "lm_loss_sum", "lr_factor", "plot_loss",
    "read_metrics", "train_loop",
]


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from edgeft.pipeline import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
