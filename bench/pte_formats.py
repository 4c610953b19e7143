"""Host decode speed and size of the .pte formats: float, weight-only int4 (groups of 32), int4 embeddings, int8 KV.

Each program is exported (and validated) by ``exporters.pte.export`` from the model (``int4``: PTQ under the ``int4``
scheme), then decoded one token at a time through ExecuTorch's Python runtime (``PteRuntime``) on one thread:
a 16-token prefill, then ``--new-tokens`` steps; the median of ``--repeats`` step-time means, formats interleaved.

    python bench/pte_formats.py --model tiny-llama --formats float,int4,emb-int4,kv-int8
    python bench/pte_formats.py --model smollm2-135m --formats float,int4 --new-tokens 24 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _export(model_name: str, fmt: str, out: Path, max_seq_len: int) -> dict:
    from edgeft import qat
    from edgeft.exporters import pte
    from edgeft.models import load_model, resolve_model

    src = resolve_model(model_name)
    kw: dict = {}
    if fmt == "int4":
        model, tok = load_model(src)
        cm, rec = qat.convert(model, "int4")
        src = qat.save_converted(cm, tok, rec, out / "src-int4")
    elif fmt == "emb-int4":
        kw["embedding"] = "int4"
    elif fmt == "kv-int8":
        kw["kv_cache"] = "int8"
    return pte.export(src, out / fmt, max_seq_len=max_seq_len, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--formats", default="float,int4,emb-int4,kv-int8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from edgeft.devices.executorch_runtime import PteRuntime

    fmts = args.formats.split(",")
    with tempfile.TemporaryDirectory(prefix="edgeft-pte-formats-") as d:
        reports = {f: _export(args.model, f, Path(d), args.max_seq_len) for f in fmts}
        rts = {f: PteRuntime(r["path"]) for f, r in reports.items()}
        ids = list(range(10, 26))
        times: dict[str, list[float]] = {f: [] for f in fmts}
        for rep in range(args.repeats):
            for f in fmts[rep % len(fmts) :] + fmts[: rep % len(fmts)]:  # rotate the order
                rt = rts[f]
                rt._step(ids, 0)
                t0 = time.perf_counter()
                for i in range(args.new_tokens):
                    rt._step([ids[i % len(ids)]], len(ids) + i)
                times[f].append((time.perf_counter() - t0) / args.new_tokens)
        for rt in rts.values():
            rt.close()
    print(
        f"{args.model}, one thread, {args.new_tokens} decode steps after a 16-token prefill, median of {args.repeats}"
    )
    print(f"{'format':10s} {'MiB':>8s} {'KV KiB':>8s} {'ms/token':>9s} {'tokens/s':>9s} {'rel_err':>8s}")
    for f in fmts:
        r, ms = reports[f], statistics.median(times[f]) * 1e3
        print(
            f"{f:10s} {r['bytes'] / 2**20:8.1f} {r['kv_cache']['bytes'] / 1024:8.0f} {ms:9.2f} {1e3 / ms:9.1f} "
            f"{r['validation']['rel_err']:8.2g}"
        )


if __name__ == "__main__":
    main()
