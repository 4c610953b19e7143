"""bench/accuracy.py's intervals for accuracy recovery, on synthetic per-question results whose answer is known."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_accuracy", Path(__file__).parents[1] / "bench" / "accuracy.py")
A = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(A)


def _nested(n: int, bf16: int, ptq: int, qat: int) -> dict[str, list[bool]]:
    """PTQ's right answers within QAT's within BF16's: every question one variant gets right, the better ones do."""
    return {
        "bf16": [i < bf16 for i in range(n)],
        "ptq": [i < ptq for i in range(n)],
        "qat": [i < qat for i in range(n)],
    }


def test_clopper_pearson_against_closed_forms():
    a = 0.025
    assert A.clopper_pearson(0, 10) == (0.0, pytest.approx(1 - a ** (1 / 10), abs=1e-9))
    assert A.clopper_pearson(10, 10) == (pytest.approx(a ** (1 / 10), abs=1e-9), 1.0)
    lo, hi = A.clopper_pearson(25, 200)
    # the endpoints are where the binomial tails equal 2.5%
    assert 1 - A._binom_cdf(24, 200, lo) == pytest.approx(a, abs=1e-9)
    assert A._binom_cdf(25, 200, hi) == pytest.approx(a, abs=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert lo == pytest.approx(scipy_stats.beta.ppf(a, 25, 176), abs=1e-9)
    assert hi == pytest.approx(scipy_stats.beta.ppf(1 - a, 26, 175), abs=1e-9)


def test_paired_interval_collapses_when_qat_answers_as_bf16_or_as_ptq():
    base = _nested(200, 34, 7, 7)
    same_as_ptq = A.intervals(base, n_boot=4000)
    assert same_as_ptq["recovery"] == 0 and same_as_ptq["recovery_ci_paired"] == [0.0, 0.0]
    same_as_bf16 = A.intervals({**base, "qat": base["bf16"]}, n_boot=4000)
    assert same_as_bf16["recovery"] == 1 and same_as_bf16["recovery_ci_paired"] == [1.0, 1.0]
    assert same_as_bf16["paired_share_at_or_above_target"] == 1.0
    # without the pairing the same accuracies leave a wide interval
    lo, hi = same_as_bf16["recovery_ci_independent"]
    assert lo < 0.75 and hi > 1.2
    assert same_as_bf16["discordant"]["qat_vs_bf16"] == {"qat_only": 0, "bf16_only": 0}


def test_paired_interval_equals_the_exact_bootstrap_distribution_of_a_nested_case():
    n, b, p, q = 200, 34, 7, 25  # the bench's counts: 18 questions only QAT and BF16 get, 9 only BF16
    res = A.intervals(_nested(n, b, p, q), n_boot=40000, seed=1)
    assert res["correct"] == {"bf16": b, "ptq": p, "qat": q} and res["recovery"] == pytest.approx(18 / 27)
    assert res["discordant"] == {
        "qat_vs_ptq": {"qat_only": 18, "ptq_only": 0},
        "bf16_vs_ptq": {"bf16_only": 27, "ptq_only": 0},
        "qat_vs_bf16": {"qat_only": 0, "bf16_only": 9},
    }
    # resampling questions draws X (QAT-and-BF16-only) and Y (BF16-only) counts from a multinomial; recovery is
    # X / (X + Y): its quantiles by enumerating the multinomial's probabilities
    px, py = 18 / n, 9 / n
    atoms = []
    for x in range(0, 80):
        for y in range(0, 80):
            if x + y == 0:
                continue
            lp = (
                math.lgamma(n + 1)
                - math.lgamma(x + 1)
                - math.lgamma(y + 1)
                - math.lgamma(n - x - y + 1)
                + x * math.log(px)
                + y * math.log(py)
                + (n - x - y) * math.log1p(-px - py)
            )
            atoms.append((x / (x + y), math.exp(lp)))
    atoms.sort()
    total = sum(w for _, w in atoms)

    def quantile(level):
        acc = 0.0
        for r, w in atoms:
            acc += w / total
            if acc >= level:
                return r

    lo, hi = res["recovery_ci_paired"]
    assert lo == pytest.approx(quantile(0.025), abs=0.02) and hi == pytest.approx(quantile(0.975), abs=0.02)
    ilo, ihi = res["recovery_ci_independent"]
    assert ilo < lo and ihi > hi  # the independent one ignores that 173 questions agree


def test_question_intervals_match_rows_by_id_not_by_order():
    rng = random.Random(0)
    data = _nested(50, 20, 5, 15)
    rows = []
    for var, correct in data.items():
        order = list(range(50))
        rng.shuffle(order)
        rows += [
            {"variant": var, "runtime": "eager", "kind": "exact", "index": i, "id": f"q{i}", "correct": correct[i]}
            for i in order
        ]
        rows += [
            {"variant": var, "runtime": "eager", "kind": "mc", "index": i, "id": f"m{i}", "correct": i % 2 == 0}
            for i in order
        ]
    got = A.question_intervals(rows, ["eager", "pte"], n_boot=2000)
    assert set(got) == {"eager"}  # no pte rows
    exact = got["eager"]["accuracy"]
    assert exact["discordant"]["qat_vs_ptq"] == {"qat_only": 10, "ptq_only": 0}
    assert exact["recovery"] == pytest.approx(10 / 15)
    assert got["eager"]["mc_accuracy"]["recovery"] is None  # PTQ lost nothing: recovery undefined
    assert got["eager"]["mc_accuracy"]["recovery_ci_paired"] is None
    with pytest.raises(ValueError):
        A.intervals({"bf16": [True], "ptq": [True, False], "qat": [False]})


def test_every_qat_and_fit_setting_is_a_recipe_key():
    """--twin copies a twin whose config differs from the recipe's only in RECIPE_KEYS: a QAT or fit setting
    missing there (learned-mixed's qat_gen_temperature once) refuses every twin for that recipe."""
    from edgeft import TrainConfig
    from edgeft.config import flat_keys

    keys = [k for k in flat_keys(TrainConfig(model="tiny-llama").to_dict()) if k.split(".")[0] in ("qat", "fit")]
    assert keys, "the config has no qat./fit. section"
    flat = {"qat" if k == "qat.scheme" else k.replace(".", "_") for k in keys}
    flat -= {"qat_group_size", "qat_ptq"}  # they change the twin's own PTQ (baseline/converted): a twin must match
    assert flat <= set(A.RECIPE_KEYS), sorted(flat - set(A.RECIPE_KEYS))
    for name, recipe in A.RECIPES.items():
        assert set(recipe) <= set(A.RECIPE_KEYS), name
