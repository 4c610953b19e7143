"""Where a quantization scheme loses task accuracy: exact match of one trained float model with the scheme's fake
quantization applied to all of its layers, to some module kinds only, or with some kinds kept at int8.

The variants are the library's (``edgeft.qat.sensitivity.apply_variant``); the fake quantization is edgeft's reference
(``edgeft.qat.fake_quant``: the grids convert writes, bit for bit), its weights quantized once; exact match is the
evaluator's (``edgeft.devices.evaluate.exact_match``, greedy, the ``builtin:tasks`` test questions). So a variant's
number is what PTQ of that mixed-precision model would score in eager PyTorch: ``all`` reproduces the accuracy
benchmark's PTQ row. Runs on a CPU, ~2 minutes a variant for 200 questions on one thread.

    python bench/sensitivity.py --model runs/acc-twin/baseline/model --limit 200 \\
        --variants float,all,only=self_attn,only=mlp,only=lm_head,int8=down_proj --weight-scale absmax

Variants: ``float`` (nothing quantized), ``all`` (every linear and the embeddings as the scheme says),
``only=A+B`` (only linears whose name contains A or B), ``int8=A+B`` (all, with those linears' weights at int8 per
output channel instead, activations as the scheme says). Writes
``bench/results/sensitivity-<date>-<device>[-tag].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import device, result_path, versions  # noqa: E402

# the variants live in the library: the device-fit planner (edgeft.qat.plan) measures with the same code
from edgeft.qat.sensitivity import apply_variant, untie_head  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a trained float model directory (e.g. RUN/baseline/model)")
    ap.add_argument("--qat", default="phone-deployment", help="scheme or preset whose grids are applied")
    ap.add_argument("--weight-scale", default="absmax", choices=["absmax", "mse"])
    ap.add_argument("--variants", default="float,all,only=self_attn,only=mlp,only=lm_head,int8=down_proj")
    ap.add_argument("--limit", type=int, default=200, help="builtin:tasks test questions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from edgeft import qat
    from edgeft.data import tasks
    from edgeft.devices.evaluate import exact_match
    from edgeft.devices.runtimes import EagerRuntime
    from edgeft.models import load_model

    torch.set_num_threads(args.threads)
    plan = qat.resolve(args.qat, weight_scale=args.weight_scale)
    rows = tasks.generate("test")[: args.limit]
    results = []
    for variant in [v for v in args.variants.split(",") if v]:
        model, tok = load_model(args.model)
        untie_head(model)  # as convert does
        quantized = apply_variant(model, variant, plan)
        t0 = time.perf_counter()
        r = exact_match(EagerRuntime(model), tok, rows, 16)
        ok = [q["correct"] for q in r["per_question"]]
        results.append(
            {
                "variant": variant,
                "correct": sum(ok),
                "n": len(ok),
                "accuracy": sum(ok) / len(ok),
                "quantized_linears": len(quantized),
                "seconds": round(time.perf_counter() - t0, 1),
                "per_question": ok,
            }
        )
        print(f"{variant:40s} {sum(ok):4d}/{len(ok)}", flush=True)

    now = dt.datetime.now(dt.timezone.utc)
    dev = device()
    out = result_path("sensitivity", args.tag)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "bench": "sensitivity",
                "date": now.isoformat(timespec="seconds"),
                "device": dev,
                "versions": versions(),
                "model": args.model,
                "plan": plan.to_dict(),
                "limit": args.limit,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    tmp.replace(out)
    print(f"\n{args.qat} (weight scale {args.weight_scale}), exact match on {args.limit} builtin:tasks questions")
    print("| variant | correct | accuracy |\n|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['correct']}/{r['n']} | {100 * r['accuracy']:.1f}% |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
