"""Perplexity recovery on held-out text of other genres than anything a run trained or distilled on (issue 15).

Evaluates a trained QAT run's BF16, PTQ and QAT variants on ``builtin:mixed-genre`` (literature, reference,
technical, dialogue; docs/heldout.md) through the given runtimes, perplexity only, and reports per runtime the share
of PTQ's perplexity degradation that QAT recovered, per genre and pooled (the pooled one with its paired chunk
bootstrap interval, as ``edgeft eval`` states it). The run's eval/ is rewritten: run it after bench/accuracy.py has
read the run's own evaluation (and never on a twin other runs still reuse).

    python bench/genre_recovery.py --run runs/l180 --runtimes eager,pte,gguf --tag learned180-s42

Writes ``bench/results/genre_recovery-<date>-<device>[-tag].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import header, result_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run with --qat and its twin (bf16, ptq, qat variants)")
    ap.add_argument("--runtimes", default="eager")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()

    import torch

    from edgeft.config import load_yaml
    from edgeft.devices.evaluate import evaluate_run, load_eval_data
    from edgeft.devices.recovery import describe
    from edgeft.rundir import RunDir

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    runtimes = [r for r in args.runtimes.split(",") if r]
    data = load_eval_data(["builtin:mixed-genre"], limit=1)  # perplexity; one question each kind (not reported)
    report = evaluate_run(run, runtimes=runtimes, data=data, progress=False)
    cfg = load_yaml(RunDir(run).config_file)
    out = {
        **header("genre_recovery"),
        "run": str(run),
        "config": cfg.to_dict(),
        "genre_tokens": report.get("heldout_genre_tokens"),
        "results": [
            {k: r[k] for k in ("variant", "runtime", "perplexity", "perplexity_by_genre", "size_mb", "seconds")}
            for r in report["results"]
        ],
        "recovery_by_genre": report.get("recovery_by_genre"),
        "recovery": {rt: v.get("perplexity") for rt, v in report["recovery"].items()},
    }
    dest = result_path("genre_recovery", args.tag)
    dest.write_text(json.dumps(out, indent=2) + "\n")

    genres = list(out["genre_tokens"])
    print(f"\n{run}: builtin:mixed-genre, " + ", ".join(f"{g} {n}" for g, n in out["genre_tokens"].items()) + " tokens")
    print(f"{'variant':8} {'runtime':8} {'pooled':>8} " + " ".join(f"{g[:11]:>11}" for g in genres))
    for r in out["results"]:
        pg = r["perplexity_by_genre"]
        print(f"{r['variant']:8} {r['runtime']:8} {r['perplexity']:8.2f} " + " ".join(f"{pg[g]:11.2f}" for g in genres))
    for rt, rec in out["recovery_by_genre"].items():
        pooled = describe(out["recovery"][rt], perplexity=True) if out["recovery"].get(rt) else "n/a"
        per = ", ".join(f"{g} {100 * x:.0f}%" if x is not None else f"{g} n/a" for g, x in rec.items())
        print(f"recovery {rt}: pooled {pooled}; {per}")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
