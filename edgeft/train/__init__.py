"""Training: the loop, optimizer and schedules, plots."""

from .loop import backward_window, lm_loss_sum, train_loop
from .optim import build_optimizer, build_scheduler, lr_factor
from .plots import plot_loss, read_metrics

__all__ = ["backward_window", "build_optimizer", "build_scheduler", "lm_loss_sum", "lr_factor", "plot_loss", "read_metrics", "train_loop"]
