"""Keep an `edgeft eval` report as a benchmark result: the run's eval/report.json (recovery with its paired
intervals, per-genre perplexity) with the run's resolved config, date, device and versions.

For evaluations that `edgeft` itself runs end to end, e.g. a recipe confirmed on data never used to choose it:

    edgeft train --model smollm2-135m --data builtin:facts --qat phone-deployment --max-steps 60 --out runs/facts
    edgeft eval --run runs/facts --data builtin:facts --data builtin:mixed-genre --limit 350 --runtimes eager
    python bench/eval_report.py --run runs/facts --tag facts-default

Writes ``bench/results/eval-<date>-<device>[-tag].json`` (per-question results and samples left out) and prints the
recovery lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, result_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="an evaluated run (eval/report.json)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()

    from edgeft.config import load_yaml
    from edgeft.devices.recovery import describe
    from edgeft.rundir import RunDir

    run = RunDir(Path(args.run))
    if not run.eval_report.is_file():
        raise SystemExit(f"{args.run}: no eval/report.json (run `edgeft eval --run {args.run}` first)")
    report = json.loads(run.eval_report.read_text())
    info = run.info() if run.has_trained_model() else {}
    base = run.baseline.info() if run.baseline.has_trained_model() else {}
    out = {
        **header("eval_report"),
        "run": args.run,
        "config": load_yaml(run.config_file).to_dict(),
        "train_seconds": {
            "qat": (info.get("train") or {}).get("seconds"),
            "baseline": (base.get("train") or {}).get("seconds"),
        },
        "report": {
            **{k: v for k, v in report.items() if k != "results"},
            "results": [{k: v for k, v in r.items() if k not in ("samples", "mc_samples")} for r in report["results"]],
        },
    }
    dest = result_path("eval", args.tag)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    for rt, by in report["recovery"].items():
        for metric, rec in by.items():
            print(f"{rt} {metric}: {describe(rec, perplexity=metric == 'perplexity')}")
    for rt, rec in (report.get("recovery_by_genre") or {}).items():
        print(f"{rt} per genre: " + ", ".join(f"{g} {describe(x, True)}" for g, x in rec.items()))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
