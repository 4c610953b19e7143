"""Pool one recipe's accuracy benchmark over training seeds: the mean of the seeds' recoveries and the recovery of
the pooled counts with a stratified paired 95% interval (each seed's questions resampled within that seed,
``edgeft.devices.recovery.pooled_accuracy_recovery``), per runtime, for exact match and multiple choice.

The done-when of issue 15 is a mean over three seeds; one seed's interval is 40-100 points wide (15-20 questions
that only BF16 answers decide it), the pooled one is the interval of the three together.

    python bench/seed_pool.py bench/results/accuracy-<date>-gpu-<tag>-s{42,1,2}.json --tag default-bf16

Reads the per-question answers that ``bench/accuracy.py`` keeps in ``intervals`` (results files written before
them are refused by name); writes ``bench/results/seed_pool-<date>-<device of the inputs>[-tag].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result_path  # noqa: E402

from edgeft.devices.recovery import VARIANTS  # noqa: E402


def pool(results: list[dict]) -> dict:
    """Per runtime and metric in every input's ``intervals``: the seeds' points, their mean, and the pooled recovery."""
    from edgeft.devices.recovery import pooled_accuracy_recovery

    out: dict = {}
    runtimes = set.intersection(*(set(r["intervals"]) for r in results))
    for rt in sorted(runtimes):
        metrics = set.intersection(*(set(r["intervals"][rt]) for r in results))
        for metric in sorted(metrics):
            rows = [r["intervals"][rt][metric] for r in results]
            groups = [{v: [c == "1" for c in row["answers"][v]] for v in VARIANTS} for row in rows]
            points = [row["recovery"] for row in rows]
            out.setdefault(rt, {})[metric] = {
                "per_seed": points,
                "per_seed_paired_ci": [row["recovery_ci_paired"] for row in rows],
                "mean_of_seeds": statistics.fmean(points) if all(p is not None for p in points) else None,
                "pooled": pooled_accuracy_recovery(groups),
                "correct": {v: sum(row["correct"][v] for row in rows) for v in VARIANTS},
                "n": sum(row["n"] for row in rows),
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench/accuracy.py results files of one recipe, one per seed")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    args = ap.parse_args()

    results = [json.loads(Path(p).read_text()) for p in args.results]
    for path, r in zip(args.results, results):
        rows = [m for rt in r.get("intervals", {}).values() for m in rt.values()]
        if not rows or any("answers" not in m for m in rows):
            raise SystemExit(
                f"{path}: no per-question answers (a results file from before bench/accuracy.py kept them)"
            )
    seeds = [r["config"]["optim"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"the inputs repeat a seed ({seeds}): pool one results file per seed")
    recipes = {(r["recipe"], r["qat_max_steps"]) for r in results}
    if len(recipes) != 1:
        raise SystemExit(f"the inputs mix recipes {sorted(recipes)}: pool one recipe at a time")
    from edgeft.devices.recovery import describe
    from edgeft.fsutil import write_json

    table = pool(results)
    device = results[0]["device"]
    out = {
        "bench": "seed_pool",
        "inputs": [str(p) for p in args.results],
        "seeds": seeds,
        "recipe": results[0]["recipe"],
        "qat_max_steps": results[0]["qat_max_steps"],
        "dates": [r["date"] for r in results],
        "device": device,
        "versions": results[0]["versions"],
        "recovery": table,
    }
    name = "gpu" if device.get("name") else "cpu"
    path = result_path("seed_pool", args.tag, device=name)
    write_json(path, out)
    print(f"recipe {out['recipe']} (QAT {out['qat_max_steps']} steps), seeds {seeds}")
    for rt, metrics in table.items():
        for metric, row in metrics.items():
            per = ", ".join("n/a" if p is None else f"{p:.0%}" for p in row["per_seed"])
            mean = "n/a" if row["mean_of_seeds"] is None else f"{row['mean_of_seeds']:.0%}"
            print(f"{rt} {metric}: per seed {per}; mean {mean}; pooled {describe(row['pooled'])}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
