"""Device fit evidence (issue #17 item 3): `--qat auto` plans against uniform phone-deployment, paired per question.

Reads evaluated runs (``bench/accuracy.py`` trains, exports and evaluates them) and prints, per run: its plan, the
``.pte`` and GGUF sizes, whether each fits its budget (``devices check``'s estimate at the plan's context, plus the
plan's size cap and decode floor), and the QAT model's exact match through each runtime; for every auto run the
difference to the uniform run with a 95% paired bootstrap interval over the same questions (and the discordant
counts). The uniform run is the reference the issue names: ``phone-deployment`` of the same or larger size.

    python bench/accuracy.py --run runs/acc                                   # uniform phone-deployment (+ twin)
    python bench/accuracy.py --twin runs/acc --run runs/fit-a4 --recipe fit-android-4gb-4k --tag fit-a4
    python bench/accuracy.py --twin runs/acc --run runs/fit-80 --recipe fit-80mb --tag fit-80
    python bench/device_fit.py --uniform runs/acc --auto runs/fit-a4 runs/fit-80
    python bench/device_fit.py ... --heldout eval-mixed/report.json   # + perplexity on text never used (below)

Writes ``bench/results/device-fit-<date>-<device>[-tag].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import device, result_path, versions  # noqa: E402


def qat_correct(run: Path, runtime: str, kind: str = "exact") -> dict[str, bool]:
    """The QAT model's per-question correctness through ``runtime`` (eval/questions.jsonl), by question id."""
    from edgeft.devices.evaluate import read_questions

    rows = read_questions(run)
    if rows is None:
        raise SystemExit(f"{run}: no per-question evaluation (run bench/accuracy.py or edgeft eval on it)")
    return {
        q["id"]: bool(q["correct"])
        for q in rows
        if q["variant"] == "qat" and q["runtime"] == runtime and q["kind"] == kind
    }


def paired_difference(
    a: dict[str, bool], b: dict[str, bool], n_boot: int = 20000, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Accuracy of ``a`` minus ``b`` on the questions both answered, with a percentile bootstrap interval resampling
    questions (the same resample for both) and the discordant counts."""
    import numpy as np

    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two runs share no question")
    x = np.asarray([a[i] for i in ids], dtype=np.float64)
    y = np.asarray([b[i] for i in ids], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    d = x[idx].mean(1) - y[idx].mean(1)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return {
        "n": len(ids),
        "a": int(x.sum()),
        "b": int(y.sum()),
        "difference": float(x.mean() - y.mean()),
        "ci": [float(lo), float(hi)],
        "a_only": int(((x == 1) & (y == 0)).sum()),
        "b_only": int(((x == 0) & (y == 1)).sum()),
    }


def perplexity_ratio(a: dict[str, Any], b: dict[str, Any], n_boot: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Perplexity of ``a`` over that of ``b`` on the same held-out chunks (an evaluation's ``ppl_chunks``: summed
    nll and tokens per chunk), with a 95% bootstrap interval resampling chunks (the same resample for both)."""
    import numpy as np

    if list(a["tokens"]) != list(b["tokens"]):
        raise ValueError("the two evaluations did not read the same held-out chunks")
    na, nb, t = (np.asarray(x, dtype=np.float64) for x in (a["nll"], b["nll"], a["tokens"]))
    idx = np.random.default_rng(seed).integers(0, len(t), size=(n_boot, len(t)))
    r = np.exp((na[idx].sum(1) - nb[idx].sum(1)) / t[idx].sum(1))
    lo, hi = np.quantile(r, [0.025, 0.975])
    return {"ratio": float(np.exp((na.sum() - nb.sum()) / t.sum())), "ci": [float(lo), float(hi)], "chunks": len(t)}


def heldout_rows(run: Path, report: str) -> dict[str, dict[str, Any]]:
    """The QAT rows of ``run``/``report`` (an ``edgeft eval`` report.json kept aside, e.g. on builtin:mixed-genre),
    by runtime."""
    path = run / report
    if not path.exists():
        raise SystemExit(f"{path}: no such evaluation (copy eval/ aside after `edgeft eval --data ...`)")
    return {r["runtime"]: r for r in json.loads(path.read_text())["results"] if r["variant"] == "qat"}


def describe_run(run: Path, budget: Any = None) -> dict[str, Any]:
    """Plan, artifact sizes and fit of one run's QAT exports, against ``budget`` (a ``qat.plan.Budget``; default the
    run's own plan's: the uniform run is judged by the auto run's budget). An artifact the budget does not target
    (``--fit-artifact``) is sized and estimated but always "fits"."""
    from edgeft.devices import profiles
    from edgeft.qat import plan as fit

    plan = fit.load(run)
    rec = json.loads((run / "converted" / "scheme.json").read_text())
    out: dict[str, Any] = {
        "run": str(run),
        "plan": "auto" if plan else rec["plan"]["name"],
        "group_size": rec["plan"]["group_size"],
        "int8_linears": len(rec.get("int8_linears", [])),
    }
    budget = budget or (plan.budget if plan else None)
    dev = budget.device if budget else None
    context = budget.context if budget else 2048
    for art, path in (("pte", run / "exports" / "model.pte"), ("gguf", run / "exports" / "model-q4_0.gguf")):
        if not path.exists():
            continue
        row: dict[str, Any] = {"mb": path.stat().st_size / fit.MB}
        if plan:
            row["predicted_mb"] = plan.predicted[art]["bytes"] / fit.MB
        ok = budget is None or budget.max_size_mb is None or row["mb"] <= budget.max_size_mb
        if dev:
            r = profiles.check(profiles.get_profile(dev), path, context=context)
            row.update(runtime_memory_mb=r["runtime_memory_mb"], decode_tokens_per_s=r["decode_tokens_per_s"])
            slow = bool(budget and budget.min_decode and r["decode_tokens_per_s"][0] < budget.min_decode)
            ok = ok and r["fits"] and not slow
        row["fits"] = ok or (budget is not None and art not in budget.targets)
        row["budgeted"] = budget is None or art in budget.targets
        out[art] = row
    out["budget"] = {
        "device": dev,
        "context": context,
        **({"max_size_mb": budget.max_size_mb, "min_decode": budget.min_decode} if budget else {}),
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uniform", required=True, help="the uniform phone-deployment run (evaluated)")
    ap.add_argument("--auto", nargs="+", required=True, help="--qat auto runs (evaluated)")
    ap.add_argument("--runtimes", default="pte,gguf")
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--heldout",
        help="an evaluation report inside every run (e.g. eval-mixed/report.json, written by `edgeft eval --data "
        "builtin:mixed-genre` and copied aside): adds each auto run's perplexity over the uniform run's there",
    )
    args = ap.parse_args()

    from edgeft.qat import plan as fit

    uniform = Path(args.uniform)
    runtimes = [r for r in args.runtimes.split(",") if r]
    rows = []
    for run in map(Path, args.auto):
        info = describe_run(run)
        ref = describe_run(uniform, fit.load(run).budget)  # the uniform run against the auto run's budget
        info["uniform"] = ref
        info["vs_uniform"] = {rt: paired_difference(qat_correct(run, rt), qat_correct(uniform, rt)) for rt in runtimes}
        if args.heldout:
            mine, ref_rows = heldout_rows(run, args.heldout), heldout_rows(uniform, args.heldout)
            info["heldout"] = {
                "report": args.heldout,
                **{
                    rt: {
                        "perplexity": mine[rt]["perplexity"],
                        "uniform": ref_rows[rt]["perplexity"],
                        "by_genre": mine[rt].get("perplexity_by_genre"),
                        "uniform_by_genre": ref_rows[rt].get("perplexity_by_genre"),
                        "vs_uniform": perplexity_ratio(mine[rt]["ppl_chunks"], ref_rows[rt]["ppl_chunks"]),
                    }
                    for rt in runtimes
                },
            }
        rows.append(info)

    now = dt.datetime.now(dt.timezone.utc)
    dev = device()
    out = result_path("device-fit", args.tag)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "bench": "device_fit",
                "date": now.isoformat(timespec="seconds"),
                "device": dev,
                "versions": versions(),
                "uniform": str(uniform),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    tmp.replace(out)
    print(
        "| run | budget | plan | .pte MB (fits) | GGUF MB (fits) | "
        + " | ".join(f"{rt}: auto - uniform [95% paired]" for rt in runtimes)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(runtimes))
    for r in rows:
        b = r["budget"]
        budget = ", ".join(
            x
            for x in (b["device"], f"{b['max_size_mb']:g} MB" if b.get("max_size_mb") else None, f"{b['context']} ctx")
            if x
        )
        cells = []
        for rt in runtimes:
            d = r["vs_uniform"][rt]
            cells.append(
                f"{d['a']}/{d['n']} vs {d['b']}/{d['n']}: {100 * d['difference']:+.1f} pts "
                f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] ({d['a_only']}/{d['b_only']} discordant)"
            )

        def size(x: dict[str, Any], art: str) -> str:
            a = x.get(art)
            if not a:
                return "-"
            return f"{a['mb']:.1f} ({('yes' if a['fits'] else 'no') if a['budgeted'] else 'not budgeted'})"

        print(
            f"| {r['run']} | {budget} | g{r['group_size']}, {r['int8_linears']} int8 | {size(r, 'pte')} vs uniform "
            f"{size(r['uniform'], 'pte')} | {size(r, 'gguf')} vs uniform {size(r['uniform'], 'gguf')} | "
            + " | ".join(cells)
            + " |"
        )
    for r in rows:
        for rt in runtimes if "heldout" in r else ():
            h = r["heldout"][rt]
            v = h["vs_uniform"]
            print(
                f"{r['run']} {rt}: held-out perplexity {h['perplexity']:.2f} vs uniform {h['uniform']:.2f}, ratio "
                f"{v['ratio']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] over {v['chunks']} chunks"
            )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
