"""Device regression checks: fail CI when an exported artifact's metrics drift from golden numbers.

A golden file lists metrics of (variant, runtime) pairs with a tolerance each:

    {"metrics": [{"variant": "qat", "runtime": "pte", "metric": "perplexity", "value": 12.3, "rel_tol": 0.01},
                 {"variant": "qat", "runtime": "gguf", "metric": "accuracy", "value": 0.4, "abs_tol": 0.05}]}

``check(report, golden)`` returns one line per drifted or missing metric; ``golden_from_report`` writes one
from an evaluation report with default tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

DEFAULT_TOL = {
    "perplexity": {"rel_tol": 0.02},
    "accuracy": {"abs_tol": 0.05},
    "mc_accuracy": {"abs_tol": 0.05},
    "size_mb": {"rel_tol": 0.01},
}


def load_golden(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"golden file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeftError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), list):
        raise EdgeftError(f'{path}: expected {{"metrics": [...]}}')
    for i, m in enumerate(data["metrics"]):
        missing = {"variant", "runtime", "metric", "value"} - set(m)
        if missing:
            raise EdgeftError(f"{path}: metric {i} lacks {sorted(missing)}")
        if "rel_tol" not in m and "abs_tol" not in m:
            raise EdgeftError(f"{path}: metric {i} needs rel_tol or abs_tol")
    return data


def check(report: dict[str, Any], golden: dict[str, Any]) -> list[str]:
    """One line per metric outside its tolerance (or absent from the report); empty when all hold."""
    by = {(r["variant"], r["runtime"]): r for r in report["results"]}
    problems = []
    for m in golden["metrics"]:
        key = (m["variant"], m["runtime"])
        name = f"{m['variant']}/{m['runtime']}/{m['metric']}"
        if key not in by or m["metric"] not in by[key]:
            problems.append(f"{name}: missing from the evaluation")
            continue
        got, want = float(by[key][m["metric"]]), float(m["value"])
        tol = m.get("abs_tol")
        if tol is None:
            tol = float(m["rel_tol"]) * abs(want)
        if not abs(got - want) <= tol:
            problems.append(f"{name}: {got:.6g} drifted from {want:.6g} (tolerance ±{tol:.3g})")
    return problems


def golden_from_report(
    report: dict[str, Any], metrics: tuple[str, ...] = ("perplexity", "accuracy", "mc_accuracy", "size_mb")
) -> dict[str, Any]:
    """A golden file capturing a report's metrics with the default tolerances (those a result row has)."""
    rows = []
    for r in report["results"]:
        for metric in metrics:
            if metric not in r:  # a report from before the metric existed
                continue
            rows.append(
                {
                    "variant": r["variant"],
                    "runtime": r["runtime"],
                    "metric": metric,
                    "value": r[metric],
                    **DEFAULT_TOL[metric],
                }
            )
    return {"model": report.get("model"), "qat": report.get("qat"), "metrics": rows}
