"""Plots users look at: the loss curve of a run (and its no-QAT twin when there is one)."""

from __future__ import annotations

import json
from pathlib import Path

from edgeft.fsutil import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(curves: dict[str, list[dict]], dest: str | Path, title: str = "training loss") -> Path:
    """Write a PNG of loss per optimizer step, one line per labelled curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, rows in curves.items():
        if rows:
            (line,) = ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label, linewidth=1.4)
            ev = [r for r in rows if "eval_loss" in r]
            if ev:
                ax.plot(
                    [r["step"] for r in ev],
                    [r["eval_loss"] for r in ev],
                    "o--",
                    color=line.get_color(),
                    label=f"{label} (eval)",
                    linewidth=1.0,
                    markersize=3,
                )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or any("eval_loss" in r for rows in curves.values() for r in rows):
        ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(dest)
