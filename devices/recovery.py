"""How much of PTQ's degradation QAT recovered, with a paired 95% interval, and whether the evaluation can tell.

recovery = (QAT − PTQ) / (BF16 − PTQ) for accuracies, (PTQ − QAT) / (PTQ − BF16) for perplexity. BF16, PTQ and QAT
are measured on the same units (questions; held-out text chunks, each from a fresh context, for perplexity), so the
interval is a percentile bootstrap that resamples units, the same resample for all three variants (paired): a
question every variant answers alike moves none of the differences. Seeded (:data:`SEED`), :data:`RESAMPLES`
resamples, numpy only. :data:`RULE` says when a recovery is a number and when it is "not resolved".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

VARIANTS = ("bf16", "ptq", "qat")
METRICS = ("perplexity", "accuracy", "mc_accuracy")  # the recoveries a report carries, per runtime
LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
MAX_WIDTH = 1.0  # widest recovery interval (as a fraction: 100 points) still reported as a number
RULE = (
    "A recovery is shown as a percentage only when the paired 95% bootstrap interval of PTQ's loss "
    "(BF16 − PTQ, resampling the questions or text chunks) excludes zero and the recovery's own 95% interval is "
    'at most 100 points wide; otherwise it reads "not resolved" with the numbers that decide it.'
)
_BLOCK = 250  # resamples drawn at a time: memory stays at 250 x units whatever the question count


def recovery(bf16: float, ptq: float, qat: float, higher_is_better: bool) -> float | None:
    """Share of PTQ's degradation that QAT recovered (the point estimate); None when PTQ did not degrade."""
    gap = (bf16 - ptq) if higher_is_better else (ptq - bf16)
    if gap <= 1e-12:
        return None
    gain = (qat - ptq) if higher_is_better else (ptq - qat)
    return gain / gap


def _resample(n: int, n_boot: int, seed: int, stat: Any) -> np.ndarray:
    """``stat(idx)`` ([block, n] unit indices drawn with replacement -> [block, k]) over ``n_boot`` resamples."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, _BLOCK):
        out.append(stat(rng.integers(0, n, size=(min(_BLOCK, n_boot - start), n))))
    return np.concatenate(out)


def _summary(
    point: Mapping[str, float],
    samples: np.ndarray,
    higher_is_better: bool,
    n: int,
    unit: str,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """The recovery, its interval and the verdict from point values and [n_boot, 3] resampled values
    (bf16, ptq, qat)."""
    sign = 1.0 if higher_is_better else -1.0
    gap = sign * (samples[:, 0] - samples[:, 1])  # PTQ's loss: > 0 when PTQ is worse than BF16
    gain = sign * (samples[:, 2] - samples[:, 1])  # QAT's gain over PTQ
    tail = 100 * (1 - level) / 2
    gap_ci = [float(x) for x in np.percentile(gap, [tail, 100 - tail])]
    defined = gap > 0
    ratio = gain[defined] / gap[defined]
    ci = [float(x) for x in np.percentile(ratio, [tail, 100 - tail])] if ratio.size else None
    rec = recovery(*(float(point[v]) for v in VARIANTS), higher_is_better)
    if gap_ci[1] < 0:  # PTQ better than BF16 beyond noise
        reason = "ptq_did_not_degrade"
    elif gap_ci[0] <= 0 or rec is None:
        reason = "ptq_within_noise"
    elif ci is None or ci[1] - ci[0] > MAX_WIDTH:
        reason = "interval_too_wide"
    else:
        reason = None
    return {
        "point": rec,
        "interval": ci,
        "resolved": reason is None,
        "reason": reason,
        "values": {v: float(point[v]) for v in VARIANTS},
        "ptq_loss": float(sign * (point["bf16"] - point["ptq"])),
        "ptq_loss_interval": gap_ci,
        "n": n,
        "unit": unit,
        "level": level,
        "resamples": n_boot,
        "seed": seed,
        # resamples where PTQ lost nothing (recovery undefined there; the interval is over the others)
        "undefined_share": float(1 - defined.mean()),
    }


def accuracy_recovery(
    correct: Mapping[str, Sequence[bool]], *, n_boot: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> dict[str, Any]:
    """Recovery of an accuracy from each question's correctness per variant (bf16, ptq, qat; same question order),
    resampling questions: point, ``interval``, ``resolved`` and ``reason`` (None, ``ptq_within_noise``,
    ``ptq_did_not_degrade``, ``interval_too_wide``), and the numbers behind them."""
    if not len(correct[VARIANTS[0]]):
        raise ValueError("no questions")
    # one repeat pooled is the plain paired bootstrap: the same draws, the same numbers
    res = pooled_accuracy_recovery([correct], n_boot=n_boot, seed=seed, level=level)
    res.pop("groups")
    return res


def pooled_accuracy_recovery(
    groups: Sequence[Mapping[str, Sequence[bool]]],
    *,
    n_boot: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Recovery of an accuracy pooled over independent repeats (training seeds), each a :func:`accuracy_recovery`
    input: the point from the pooled counts, the interval from a stratified paired bootstrap (each repeat's questions
    resampled within that repeat, the same draw for its three variants), so the interval is that of the pooled
    ratio and no resample moves questions between repeats. Keys as :func:`accuracy_recovery`'s, plus ``groups``."""
    mats = [np.stack([np.asarray(g[v], dtype=np.float64) for v in VARIANTS], axis=1) for g in groups]
    if not mats or any(not m.shape[0] for m in mats):
        raise ValueError("every group needs questions")
    m = np.concatenate(mats)  # [sum n, 3]
    offsets = np.cumsum([0] + [x.shape[0] for x in mats[:-1]])
    sizes = [x.shape[0] for x in mats]
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n_boot, _BLOCK):
        b = min(_BLOCK, n_boot - start)
        idx = np.concatenate([off + rng.integers(0, n, size=(b, n)) for off, n in zip(offsets, sizes)], axis=1)
        out.append(m[idx].mean(1))
    samples = np.concatenate(out)
    res = _summary(dict(zip(VARIANTS, m.mean(0))), samples, True, m.shape[0], "questions", n_boot, seed, level)
    return {**res, "groups": len(mats)}


def perplexity_recovery(
    nll: Mapping[str, Sequence[float]],
    tokens: Sequence[int],
    *,
    n_boot: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Recovery of perplexity, exp(sum NLL / sum tokens), from each chunk's NLL sum per variant and the chunks'
    predicted-token counts (the same chunks for every variant), resampling chunks; keys as
    :func:`accuracy_recovery`'s, plus ``tokens``."""
    s = np.stack([np.asarray(nll[v], dtype=np.float64) for v in VARIANTS], axis=1)  # [chunks, 3]
    t = np.asarray(tokens, dtype=np.float64)
    if not t.size or t.size != s.shape[0]:
        raise ValueError("every variant needs one NLL sum per chunk")
    samples = _resample(t.size, n_boot, seed, lambda idx: np.exp(s[idx].sum(1) / t[idx].sum(1)[:, None]))
    point = dict(zip(VARIANTS, np.exp(s.sum(0) / t.sum())))
    return {**_summary(point, samples, False, t.size, "chunks", n_boot, seed, level), "tokens": int(t.sum())}


def point_only(values: Mapping[str, float], higher_is_better: bool) -> dict[str, Any]:
    """A recovery without per-unit results to resample (a report from before them): the point, no verdict."""
    return {
        "point": recovery(values["bf16"], values["ptq"], values["qat"], higher_is_better),
        "interval": None,
        "resolved": None,
        "reason": "no_per_unit_results",
        "values": {v: float(values[v]) for v in VARIANTS},
    }


def recovery_table(
    results: list[dict[str, Any]], questions: list[dict[str, Any]] | None = None, **kw: Any
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per runtime that has all three variants, per metric in :data:`METRICS` its results carry, the recovery.

    ``results``: the evaluator's rows (``variant``, ``runtime``, the metrics, ``ppl_chunks`` = {"nll", "tokens"});
    ``questions``: its per-question rows (eval/questions.jsonl), matched across variants by (index, id). A metric
    without per-unit results for all three variants gets :func:`point_only`. ``kw``: n_boot, seed, level.
    """
    by = {(r["variant"], r["runtime"]): r for r in results}
    runtimes = sorted({r["runtime"] for r in results})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rt in runtimes:
        rows = [by.get((v, rt)) for v in VARIANTS]
        if any(r is None for r in rows):
            continue
        rec = out.setdefault(rt, {})
        for metric in METRICS:
            if not all(metric in r for r in rows):
                continue
            values = {v: r[metric] for v, r in zip(VARIANTS, rows)}
            rec[metric] = point_only(values, metric != "perplexity")
            if metric == "perplexity":
                chunks = [r.get("ppl_chunks") for r in rows]
                if all(chunks) and all(c["tokens"] == chunks[0]["tokens"] for c in chunks):
                    rec[metric] = perplexity_recovery(
                        {v: c["nll"] for v, c in zip(VARIANTS, chunks)}, chunks[0]["tokens"], **kw
                    )
                continue
            kind = "exact" if metric == "accuracy" else "mc"
            per = {
                v: {
                    (q["index"], q["id"]): q["correct"]
                    for q in questions or ()
                    if q["runtime"] == rt and q["kind"] == kind and q["variant"] == v
                }
                for v in VARIANTS
            }
            keys = sorted(per["bf16"])
            if keys and all(sorted(per[v]) == keys for v in VARIANTS):
                rec[metric] = accuracy_recovery({v: [per[v][k] for k in keys] for v in VARIANTS}, **kw)
    return out


def _value(x: float, perplexity: bool) -> str:
    return f"{x:.2f}" if perplexity else f"{100 * x:.1f}%"


def describe(rec: dict[str, Any] | float | None, perplexity: bool = False) -> str:
    """One recovery as the report prints it: ``93% (95% CI 75-111%)`` or ``not resolved (...)`` with the numbers
    that decide it. A bare float or None (a report from before intervals) prints as the point alone."""
    if not isinstance(rec, dict):
        return "n/a (PTQ did not degrade)" if rec is None else f"{100 * rec:.0f}%"
    v = rec["values"]
    n = (
        f"{rec['n']} {rec['unit']}" + (f", {rec['tokens']} tokens in all" if rec.get("tokens") else "")
        if "n" in rec
        else ""
    )
    both = f"BF16 {_value(v['bf16'], perplexity)}, PTQ {_value(v['ptq'], perplexity)}"
    reason = rec["reason"]
    if reason == "ptq_did_not_degrade":
        return f"n/a (PTQ did not degrade: {both}, {n})"
    if reason == "ptq_within_noise":
        return f"not resolved (PTQ within noise of BF16: {both}, {n})"
    lo, hi = rec["interval"] or (float("nan"), float("nan"))
    if reason == "interval_too_wide":
        return (
            f"not resolved (95% CI {100 * lo:.0f}% to {100 * hi:.0f}%, wider than 100 points: {both}, "
            f"QAT {_value(v['qat'], perplexity)}, {n})"
        )
    if reason == "no_per_unit_results":
        return "n/a (PTQ did not degrade)" if rec["point"] is None else f"{100 * rec['point']:.0f}% (no interval)"
    return f"{100 * rec['point']:.0f}% (95% CI {100 * lo:.0f}% to {100 * hi:.0f}%)"
