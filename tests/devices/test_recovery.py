"""devices/recovery.py: the paired bootstrap of QAT's recovery against known answers (identical variants, nested
cases, analytic normal-approximation intervals), the "not resolved" verdict through the real report writer, and the
report's JSON schema."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgeft.config import TrainConfig, dump_yaml
from edgeft.devices import evaluate as ev
from edgeft.devices import recovery as R
from edgeft.rundir import RunDir

Z = 1.959963984540054  # the normal's 97.5% quantile


def questions(n: int, groups: list[tuple[int, tuple[int, int, int]]]) -> dict[str, list[bool]]:
    """Per-question correctness of (bf16, ptq, qat): ``count`` questions of each pattern, the rest wrong for all."""
    out: dict[str, list[bool]] = {v: [] for v in R.VARIANTS}
    for count, pattern in groups:
        for v, ok in zip(R.VARIANTS, pattern):
            out[v] += [bool(ok)] * count
    return {v: x + [False] * (n - len(x)) for v, x in out.items()}


def check_schema(rec: dict) -> None:
    """One recovery entry of report.json: the keys every consumer reads, with their types, through a JSON round trip."""
    assert json.loads(json.dumps(rec)) == rec
    assert set(rec) >= {
        "point",
        "interval",
        "resolved",
        "reason",
        "values",
        "ptq_loss",
        "ptq_loss_interval",
        "n",
        "unit",
        "level",
        "resamples",
        "seed",
        "undefined_share",
    }
    assert rec["point"] is None or type(rec["point"]) is float
    assert rec["interval"] is None or (len(rec["interval"]) == 2 and all(type(x) is float for x in rec["interval"]))
    assert type(rec["resolved"]) is bool and rec["resolved"] == (rec["reason"] is None)
    assert rec["reason"] in (None, "ptq_within_noise", "ptq_did_not_degrade", "interval_too_wide")
    assert set(rec["values"]) == set(R.VARIANTS) and all(type(x) is float for x in rec["values"].values())
    lo, hi = rec["ptq_loss_interval"]
    assert lo <= rec["ptq_loss"] <= hi
    assert rec["unit"] in ("questions", "chunks") and rec["level"] == 0.95 and rec["resamples"] == R.RESAMPLES


def test_identical_variants_are_not_resolved():
    same = questions(30, [(24, (1, 1, 1))])
    rec = R.accuracy_recovery(same)
    check_schema(rec)
    assert rec["point"] is None and rec["resolved"] is False and rec["reason"] == "ptq_within_noise"
    assert rec["ptq_loss_interval"] == [0.0, 0.0]
    assert R.describe(rec) == "not resolved (PTQ within noise of BF16: BF16 80.0%, PTQ 80.0%, 30 questions)"


def test_one_question_apart_on_30_is_not_resolved():
    # make demo's multiple choice: BF16 and PTQ one question apart on 30; QAT lost two more (the "-67%" case)
    rec = R.accuracy_recovery(questions(30, [(20, (1, 1, 1)), (2, (1, 0, 0)), (1, (0, 1, 1)), (2, (1, 1, 0))]))
    check_schema(rec)
    assert rec["point"] == pytest.approx(-2.0) and rec["reason"] == "ptq_within_noise"
    assert R.describe(rec) == "not resolved (PTQ within noise of BF16: BF16 80.0%, PTQ 76.7%, 30 questions)"


def test_ptq_loses_40_of_200_and_qat_recovers_36():
    rec = R.accuracy_recovery(questions(200, [(110, (1, 1, 1)), (36, (1, 0, 1)), (4, (1, 0, 0))]))
    check_schema(rec)
    assert rec["values"] == {"bf16": 0.75, "ptq": 0.55, "qat": 0.73}
    assert rec["point"] == pytest.approx(0.9) and rec["resolved"] and rec["reason"] is None
    lo, hi = rec["interval"]
    assert 0 < lo < 0.9 < hi <= 1.0  # nested: QAT never beats BF16 on a question, so no resample exceeds 100%
    assert rec["ptq_loss_interval"][0] > 0 and rec["undefined_share"] == 0
    assert R.describe(rec) == f"90% (95% CI {100 * lo:.0f}% to {100 * hi:.0f}%)"
    # deterministic: the same seed gives the same interval; another seed a different one
    assert R.accuracy_recovery(questions(200, [(110, (1, 1, 1)), (36, (1, 0, 1)), (4, (1, 0, 0))])) == rec
    assert (
        R.accuracy_recovery(questions(200, [(110, (1, 1, 1)), (36, (1, 0, 1)), (4, (1, 0, 0))]), seed=1)["interval"]
        != rec["interval"]
    )


def test_the_edge_cases_of_the_rule():
    # QAT = BF16 on every question: every resample recovers exactly all of it; QAT = PTQ: none of it
    base = [(100, (1, 1, 1)), (40, (1, 0, 1))]
    assert R.accuracy_recovery(questions(200, base))["interval"] == [1.0, 1.0]
    assert R.accuracy_recovery(questions(200, [(100, (1, 1, 1)), (40, (1, 0, 0))]))["interval"] == [0.0, 0.0]
    # PTQ resolved below BF16 (10 questions apart, none the other way), but QAT's gains and losses are so few that
    # the recovery's interval spans more than 100 points: not resolved either
    wide = R.accuracy_recovery(questions(200, [(50, (1, 1, 1)), (5, (1, 0, 1)), (5, (1, 0, 0)), (5, (1, 1, 0))]))
    check_schema(wide)
    assert wide["ptq_loss_interval"][0] > 0 and wide["reason"] == "interval_too_wide"
    assert wide["interval"][1] - wide["interval"][0] > R.MAX_WIDTH
    assert R.describe(wide).startswith("not resolved (95% CI -")
    # PTQ better than BF16 beyond noise: nothing to recover
    better = R.accuracy_recovery(questions(200, [(50, (1, 1, 1)), (30, (0, 1, 1))]))
    assert better["reason"] == "ptq_did_not_degrade" and better["point"] is None
    assert R.describe(better).startswith("n/a (PTQ did not degrade: BF16 25.0%, PTQ 40.0%")


def _quantile_tolerance(sd: float, atom: float, n_boot: int = R.RESAMPLES) -> float:
    """How far a bootstrap percentile endpoint may sit from the normal approximation's: three Monte-Carlo standard
    errors of a 2.5% quantile from ``n_boot`` resamples (sqrt(q(1 - q) / B) / density at the quantile, for a
    normal of standard deviation ``sd``), plus one atom of the statistic's discrete distribution."""
    q = 0.025
    density = math.exp(-Z * Z / 2) / math.sqrt(2 * math.pi) / sd
    return 3 * math.sqrt(q * (1 - q) / n_boot) / density + atom


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intervals_agree_with_the_normal_approximation(seed):
    n = 1000
    # PTQ's loss: 100 questions only BF16 answers, 40 only PTQ. The paired difference's variance (McNemar's):
    # ((b + c) / n - d^2) / n; an unpaired bootstrap would be about twice as wide and fail this
    rec = R.accuracy_recovery(questions(n, [(300, (1, 1, 1)), (100, (1, 0, 1)), (40, (0, 1, 1))]), seed=seed)
    d = 60 / n
    sd = math.sqrt((140 / n - d * d) / n)
    tol = _quantile_tolerance(sd, 1 / n)
    assert rec["ptq_loss"] == pytest.approx(d)
    assert rec["ptq_loss_interval"] == pytest.approx([d - Z * sd, d + Z * sd], abs=tol)
    # recovery in a nested case: of S = 200 questions only BF16 answers, QAT answers X = 100: r = X / S, and the
    # delta method on the multinomial gives var(r) = r (1 - r) / S exactly at first order
    rec = R.accuracy_recovery(questions(n, [(300, (1, 1, 1)), (100, (1, 0, 1)), (100, (1, 0, 0))]), seed=seed)
    r, s = 0.5, 200
    sd = math.sqrt(r * (1 - r) / s)
    assert rec["point"] == pytest.approx(r)
    assert rec["interval"] == pytest.approx([r - Z * sd, r + Z * sd], abs=_quantile_tolerance(sd, 1 / s))


def test_perplexity_resamples_chunks():
    tokens = [255] * 8
    g = torch.Generator().manual_seed(0)
    bf16 = (3.9 + 0.3 * torch.rand(8, generator=g, dtype=torch.float64)) * 255
    ptq = bf16 + 0.4 * 255 + 5 * torch.randn(8, generator=g, dtype=torch.float64)
    nll = {"bf16": bf16.tolist(), "ptq": ptq.tolist()}
    # QAT = BF16 chunk by chunk: every resample recovers all of it; QAT = PTQ: none
    assert R.perplexity_recovery({**nll, "qat": nll["bf16"]}, tokens)["interval"] == [pytest.approx(1.0)] * 2
    assert R.perplexity_recovery({**nll, "qat": nll["ptq"]}, tokens)["interval"] == [pytest.approx(0.0)] * 2
    # QAT halfway in log-perplexity: the point is (PTQ - QAT) / (PTQ - BF16) of the pooled perplexities
    qat = ((bf16 + ptq) / 2).tolist()
    rec = R.perplexity_recovery({**nll, "qat": qat}, tokens)
    check_schema(rec)
    p = {v: math.exp(sum(x) / sum(tokens)) for v, x in {**nll, "qat": qat}.items()}
    assert rec["values"] == pytest.approx(p) and rec["tokens"] == 8 * 255 and rec["unit"] == "chunks"
    assert rec["point"] == pytest.approx((p["ptq"] - p["qat"]) / (p["ptq"] - p["bf16"]))
    assert rec["resolved"] and rec["interval"][0] < rec["point"] < rec["interval"][1]
    same = R.perplexity_recovery({v: nll["bf16"] for v in R.VARIANTS}, tokens)
    assert same["reason"] == "ptq_within_noise"
    assert R.describe(same, perplexity=True) == (
        f"not resolved (PTQ within noise of BF16: BF16 {p['bf16']:.2f}, PTQ {p['bf16']:.2f}, "
        "8 chunks, 2040 tokens in all)"
    )


class LogitsRuntime:
    """Fixed random logits per position: the per-chunk NLL has an independent reference (cross-entropy)."""

    def __init__(self, vocab: int):
        self.w = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1))

    def logits(self, ids):
        return self.w[torch.tensor(ids)]


def test_chunk_nll_sums_to_the_perplexity():
    rt, chunks = LogitsRuntime(50), [[1, 5, 7, 9, 3], [1, 2, 2], [1, 40, 41, 42]]
    got = ev.chunk_nll(rt, chunks)
    assert got["tokens"] == [4, 2, 3]
    for c, nll in zip(chunks, got["nll"]):
        ref = -torch.log_softmax(rt.w[torch.tensor(c[:-1])].double(), -1)[torch.arange(len(c) - 1), torch.tensor(c[1:])]
        assert nll == pytest.approx(float(ref.sum()), rel=1e-12)
    assert ev.perplexity(rt, chunks) == pytest.approx(math.exp(sum(got["nll"]) / 9), rel=1e-12)


def _fabricated(n_mc: int = 30) -> tuple[list[dict], list[dict]]:
    """An evaluator's results rows and per-question rows for one runtime: exact match resolved (PTQ loses 40 of
    200, QAT recovers 36), multiple choice one question apart on ``n_mc``, perplexity per chunk."""
    exact = questions(200, [(110, (1, 1, 1)), (36, (1, 0, 1)), (4, (1, 0, 0))])
    mc = questions(n_mc, [(20, (1, 1, 1)), (2, (1, 0, 0)), (1, (0, 1, 1)), (2, (1, 1, 0))])
    nll = {
        "bf16": [1020.0, 990.0, 1005.0, 1010.0],
        "ptq": [1120.0, 1100.0, 1090.0, 1130.0],
        "qat": [1040.0, 1010.0, 1020.0, 1040.0],
    }
    results, rows = [], []
    for v in R.VARIANTS:
        results.append(
            {
                "variant": v,
                "runtime": "eager",
                "perplexity": math.exp(sum(nll[v]) / 1020),
                "ppl_chunks": {"nll": nll[v], "tokens": [255] * 4},
                "accuracy": sum(exact[v]) / 200,
                "mc_accuracy": sum(mc[v]) / n_mc,
                "n_tasks": 200,
                "n_mc": n_mc,
                "size_mb": 1.0,
                "tokens_per_s": 1.0,
                "artifact": "x",
            }
        )
        rows += [
            {"variant": v, "runtime": "eager", "kind": "exact", "index": i, "id": f"e{i}", "correct": ok}
            for i, ok in enumerate(exact[v])
        ]
        rows += [
            {"variant": v, "runtime": "eager", "kind": "mc", "index": i, "id": f"m{i}", "correct": ok}
            for i, ok in enumerate(mc[v])
        ]
    return results, rows


def test_not_resolved_through_the_report_writer(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config_file.write_text(dump_yaml(TrainConfig(model="tiny-llama", qat="int8-int4")))
    results, rows = _fabricated()
    report = ev._report(run, results, ppl_tokens=1020, limit=200, data=ev.builtin_eval_data(30), questions=rows)
    report = json.loads(json.dumps(report))  # as report.json holds it
    rec = report["recovery"]["eager"]
    assert set(rec) == {"perplexity", "accuracy", "mc_accuracy"}
    for entry in rec.values():
        check_schema(entry)
    assert rec["accuracy"]["resolved"] and rec["accuracy"]["point"] == pytest.approx(0.9)
    assert rec["mc_accuracy"]["resolved"] is False and rec["mc_accuracy"]["reason"] == "ptq_within_noise"
    assert rec["perplexity"]["resolved"] and rec["perplexity"]["unit"] == "chunks"
    md = ev.render_markdown({**report, "mc_examples": 30, "mc_chance": 0.25})
    line = next(ln for ln in md.splitlines() if ln.startswith("| eager |") and "%" in ln and "CI" in ln)
    ppl, em, mc = line.strip("| ").split(" | ")[1:]
    lo, hi = rec["accuracy"]["interval"]
    assert em == f"90% (95% CI {100 * lo:.0f}% to {100 * hi:.0f}%)"
    assert mc == "not resolved (PTQ within noise of BF16: BF16 80.0%, PTQ 76.7%, 30 questions)"
    assert ppl.endswith(")") and "% (95% CI" in ppl
    assert R.RULE in md  # the rule, stated where the verdicts are
    assert "-67%" not in md and "-200%" not in md


def test_missing_per_question_rows_give_the_point_alone():
    results, rows = _fabricated()
    table = R.recovery_table(results, [q for q in rows if q["kind"] != "mc" or q["variant"] != "qat"])
    assert table["eager"]["accuracy"]["resolved"] is True
    mc = table["eager"]["mc_accuracy"]
    assert mc["resolved"] is None and mc["interval"] is None and mc["point"] == pytest.approx(-2.0)
    assert R.describe(mc) == "-200% (no interval)"
    # a runtime without all three variants gets no recovery
    assert R.recovery_table(results[:2], rows) == {}
