"""What a user watches while training: a progress bar (or log lines), TensorBoard and Weights & Biases.

The bar shows loss, learning rate, tokens/s and tqdm's ETA; without a bar (``--no-progress``, CI logs) a line is
logged every ``logging_steps`` steps with the same numbers and an ETA. TensorBoard (``--report-to tensorboard``) writes
to ``<run>/tensorboard`` through torch's SummaryWriter, purging steps past the resume point so a resumed run has one
curve; W&B (``--report-to wandb``) keeps its run id in ``<run>/wandb-id.txt`` so a resumed run continues the same
W&B run. Either one that is asked for but not installed is one clear error before training starts.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.rundir import Variant

log = logging.getLogger("edgeft")
REPORTERS = ("tensorboard", "wandb")


def check_report_to(report_to: list[str]) -> None:
    """Fail early for an unknown or uninstalled reporter."""
    for name in report_to:
        if name not in REPORTERS:
            raise EdgeftError(f"unknown --report-to {name!r}; choose from {', '.join(REPORTERS)}")
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise EdgeftError(
                    "--report-to tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
        if name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise EdgeftError("--report-to wandb needs the wandb package: pip install wandb") from None


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Progress bar or log lines, plus optional TensorBoard/W&B, for one training variant (rank 0 only)."""

    def __init__(
        self,
        *,
        total: int,
        start: int,
        desc: str,
        progress: bool,
        logging_steps: int = 10,
        report_to: list[str] | tuple = (),
        log_dir: Path | None = None,
        config: dict | None = None,
        enabled: bool = True,
    ) -> None:
        self.total, self.start, self.desc = total, start, desc
        self.enabled = enabled
        self.logging_steps = max(1, logging_steps)
        self.t0 = time.perf_counter()
        self.bar = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        check_report_to(list(report_to))
        if "tensorboard" in report_to and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Variant(log_dir).tensorboard), purge_step=start + 1 if start else None)
        if "wandb" in report_to and log_dir is not None:
            import wandb

            id_file = Variant(log_dir).wandb_id
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "edgeft"),
                name=log_dir.name,
                id=run_id,
                resume="allow",
                dir=str(log_dir),
                config=config or {},
            )

    def step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = row["step"]
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(1, done) * (self.total - step)
        if self.bar is not None:
            post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "eval_loss" in row:
                post["eval"] = f"{row['eval_loss']:.4f}"
            self.bar.set_postfix(post)
            self.bar.update(1)
        elif step % self.logging_steps == 0 or step == self.total or "eval_loss" in row:
            extra = f" | eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else ""
            log.info(
                "%s step %d/%d | loss %.4f | lr %.2e | %.0f tok/s | eta %s%s",
                self.desc,
                step,
                self.total,
                row["loss"],
                row["lr"],
                row["tokens_per_s"],
                _fmt_eta(eta),
                extra,
            )
        scalars = {k: row[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss") if k in row}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}" if k != "eval_loss" else "eval/loss", v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"edgeft: {text}")
        else:
            log.info("%s", text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
