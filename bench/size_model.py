"""The device-fit size model (edgeft.qat.plan.artifact_bytes) against the files the exporters write.

Converts a model (no training: PTQ of its weights) under an ``auto`` plan with some linears at int8 (``v_proj`` and
``down_proj`` of every third layer, and ``lm_head``), exports the GGUF (q4_0, exact) and the ``.pte``, and prints
predicted vs written bytes. CPU is enough (SmolLM2-135M on 2 cores: ~2 min GGUF, ~8 min .pte).

    python bench/size_model.py --model smollm2-135m --group-size 64 --out /tmp/size-model

Writes ``bench/results/size-model-<date>-<device>[-tag].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _common import device, result_path, versions  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="/tmp/size-model", help="scratch directory for the converted model and files")
    ap.add_argument("--artifacts", default="gguf,pte")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch

    from edgeft import qat
    from edgeft.exporters import export_dir
    from edgeft.models import load_model, resolve_model
    from edgeft.qat import plan as fit

    torch.set_num_threads(1)
    src = resolve_model(args.model)
    model, tok = load_model(src)
    shape = fit.model_shape(model, src)
    int8 = tuple(
        n
        for n in (lin.name for lin in shape.linears)
        if n.endswith(("down_proj", "v_proj")) and n.split(".")[2].isdigit() and int(n.split(".")[2]) % 3 == 0
    )
    int8 += tuple(n for n in (lin.name for lin in shape.linears) if n == "lm_head")
    plan = qat.resolve("auto", args.group_size, int8_modules=int8)
    out = Path(args.out)
    converted, record = qat.convert(model, plan)
    qat.save_converted(converted.to("cpu"), tok, record, out / "converted")
    del model, converted
    rows = []
    for art in [a for a in args.artifacts.split(",") if a]:
        predicted = fit.artifact_bytes(shape, args.group_size, set(int8), "int8", art)
        t0 = time.perf_counter()
        kw = {"quant": "q4_0"} if art == "gguf" else {"max_seq_len": 128}
        report = export_dir(art, out / "converted", out / "exports", **kw)
        rows.append(
            {
                "artifact": art,
                "predicted": predicted,
                "written": report["bytes"],
                "error": (predicted - report["bytes"]) / report["bytes"],
                "exporter_expected": report.get("expected_bytes"),
                "seconds": round(time.perf_counter() - t0),
            }
        )
        print(
            f"{art}: predicted {predicted:,} written {report['bytes']:,} ({100 * rows[-1]['error']:+.2f}%)", flush=True
        )
    now = dt.datetime.now(dt.timezone.utc)
    dev = device()
    path = result_path("size-model", args.tag)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {
                "bench": "size_model",
                "date": now.isoformat(timespec="seconds"),
                "device": dev,
                "versions": versions(),
                "model": args.model,
                "group_size": args.group_size,
                "int8": list(int8),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
