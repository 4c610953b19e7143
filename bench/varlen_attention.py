"""Padding-free attention on the GPU when every batch has a different token count.

edgeft's padding-free batches (the default) flatten each batch's examples into one packed row whose length
changes from step to step. kernels/attention.py runs them through compiled FlexAttention with a document mask.
``torch.compile(flex_attention, dynamic=False)`` at exact sizes recompiles for every new length and, after
torch's recompile limit (8), silently runs FlexAttention *unfused* (the full scores matrix in memory). This bench
runs the same sequence of packed batches (fwd + bwd, Qwen3-0.6B's attention shape) through each way of meeting
the changing length, every way in its own process (dynamo's caches and counters are per process):

- ``none``: exact sizes, dynamic=False (edgeft before this bench);
- ``pow2``: padded to the next power of two, each pad token its own document (edgeft's choice, FLEX_SHAPES);
- ``dynamic``: exact sizes, the length symbolic (dynamic=True);
- ``sdpa``: SDPA with a dense block-diagonal mask (the fallback; O(tokens^2) memory), the peer.

Pass 1 includes the compiles; pass 2 runs the same shapes again (steady state). Outputs are compared with
``sdpa`` on the first batches.

    python bench/varlen_attention.py                       # 24 batches of 2k-8k tokens
    python bench/varlen_attention.py --device cpu --modes none,sdpa --batches 2 --min-tokens 64 --max-tokens 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device, versions  # noqa: E402

MODES = ("none", "pow2", "dynamic", "sdpa")


def _batches(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """Document lengths of each packed batch (20-400 tokens, like chat examples), totals in [lo, hi]."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        want, docs = rng.randint(lo, hi), []
        while sum(docs) < want:
            docs.append(min(rng.randint(20, 400), want - sum(docs)))
        out.append(docs)
    return out


def _worker(spec: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from edgeft.kernels import attention as A

    dev, mode = spec["device"], spec["mode"]
    hq, hk, d = spec["heads"], spec["kv_heads"], spec["head_dim"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    scale = d**-0.5

    def step(docs, seed, keep=False):
        g = torch.Generator(device=dev).manual_seed(seed)
        t = sum(docs)
        grad = dev == "cuda" or mode == "sdpa"  # FlexAttention has no CPU backward (the CPU run is a dry run)
        q, k, v = (
            torch.randn(t, h, d, device=dev, dtype=dtype, generator=g).requires_grad_(grad) for h in (hq, hk, hk)
        )
        cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], device=dev, dtype=torch.int32)
        pb = A.packed_batch_from_cu_seqlens(cu, max(docs))
        if mode == "sdpa":
            o = A._sdpa_masked(q, k, v, pb, True, scale, None, None)
        else:
            o = A._flex(q, k, v, pb, True, scale, None, None, compiled=dev == "cuda", shapes=mode)
        if grad:
            o.float().square().sum().backward()
        return o.detach().float().cpu() if keep else None

    out: dict = {"mode": mode, "pass1_ms": [], "pass2_ms": []}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for p in ("pass1_ms", "pass2_ms"):
        for i, docs in enumerate(spec["batches"]):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = step(docs, i, keep=p == "pass1_ms" and i < spec["compare"])
            if dev == "cuda":
                torch.cuda.synchronize()
            out[p].append((time.perf_counter() - t0) * 1e3)
            if o is not None:
                torch.save(o, Path(spec["tmp"]) / f"{mode}-{i}.pt")
    if dev == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--compare", type=int, default=3, help="batches whose outputs are compared with sdpa")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))))
        return

    import tempfile

    import torch

    tmp = tempfile.mkdtemp(prefix="varlen-")
    batches = _batches(args.batches, args.min_tokens, args.max_tokens, args.seed)
    base = {
        "device": args.device,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "batches": batches,
        "compare": args.compare,
        "tmp": tmp,
    }
    results = []
    for mode in args.modes.split(","):
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps({**base, "mode": mode})],
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            results.append({"mode": mode, "error": p.stderr[-1500:]})
            print(f"{mode}: failed\n{p.stderr[-1500:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        r["wall_s"] = time.time() - t0
        r["recompile_warnings"] = p.stderr.count("recompile_limit")
        r["unfused_warnings"] = p.stderr.count("without torch.compile()")
        results.append(r)
        print(
            f"{mode}: pass1 {sum(r['pass1_ms']) / 1e3:.1f} s, pass2 median {statistics.median(r['pass2_ms']):.1f} ms",
            file=sys.stderr,
        )
    ok = {r["mode"]: r for r in results if "error" not in r}
    if "sdpa" in ok:
        for mode, r in ok.items():
            errs = []
            for i in range(min(args.compare, len(batches))):
                a, b = torch.load(Path(tmp) / f"{mode}-{i}.pt"), torch.load(Path(tmp) / f"sdpa-{i}.pt")
                errs.append(float((a - b).abs().max() / b.abs().max()))
            r["max_rel_err_vs_sdpa"] = max(errs)
    tokens = sum(sum(b) for b in batches)
    rows = [
        "| mode | pass 1 s (compiles) | pass 2 median ms | pass 2 tokens/s | vs sdpa | peak GiB | err vs sdpa |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = ok.get("sdpa")
    for mode, r in ok.items():
        tps = tokens / (sum(r["pass2_ms"]) / 1e3)
        r["pass2_tokens_per_s"] = tps
        vs = f"{sum(ref['pass2_ms']) / sum(r['pass2_ms']):.2f}x" if ref else "-"
        rows.append(
            f"| {mode} | {sum(r['pass1_ms']) / 1e3:.1f} | {statistics.median(r['pass2_ms']):.1f} | "
            f"{tps / 1e3:.0f}k | {vs} | {r.get('peak_gib', float('nan')):.2f} | "
            f"{r.get('max_rel_err_vs_sdpa', float('nan')):.1e} |"
        )
    table = "\n".join(rows)
    date = dt.datetime.now(dt.timezone.utc)
    doc = {
        "date": date.isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "batch_tokens": [sum(b) for b in batches],
        "results": results,
        "table": table,
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"varlen_attention-{date:%Y%m%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1))
    tmp_out.replace(out)
    print(f"\nwrote {out}\n\n{table}")


if __name__ == "__main__":
    main()
