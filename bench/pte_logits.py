"""Prefill speed of a ``.pte`` with logits for every position (``model.pte``) vs the last one only (``model-last.pte``).

Both programs come from the same converted model (``edgeft export pte`` / ``--logits last``, exported here when
missing) and run on ExecuTorch's Python runtime (``PteRuntime``: the program's own XNNPACK kernels) in one
process, with ExecuTorch's threadpool at ``--threads`` (default 1). For each prompt length n (real tokens of the
packaged held-out text) one prefill is one ``forward`` call of n tokens from position 0, as the runner makes it;
the two programs alternate call by call (so load from other processes falls on both alike), after warm-up calls,
and the median of ``--repeats`` is reported. A control row times 32 one-token decode steps, where both programs
do the same work. Also recorded: each program's planned activation memory (``non_const_buffer_sizes``), which
holds the ``[1, max_seq_len, vocab]`` logits buffer in the all-positions program.

    python bench/pte_logits.py --src runs/x/converted --out /tmp/pte-logits     # exports both if missing
    python bench/pte_logits.py --run runs/x                                      # the run's exports/

Writes ``bench/results/pte_logits-<date>-<cpu>.json`` (date, CPU, versions) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WARMUP = 3  # rounds before timing: the first calls of a program allocate and page in its weights
sys.path.insert(0, str(HERE))

from _common import device, result_path, slug, versions  # noqa: E402


def _planned_bytes(path: Path) -> int:
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(path.read_bytes())
    prog = getattr(prog, "program", prog)
    plan = next(p for p in prog.execution_plan if p.name == "forward")
    return int(sum(plan.non_const_buffer_sizes))


def _tokens(src: Path, n: int) -> list[int]:
    from importlib import resources

    from transformers import AutoTokenizer

    text = resources.files("edgeft").joinpath("assets/heldout.txt").read_text(encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(str(src)).encode(text)
    if len(ids) < n:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory: its converted/ model, programs in its exports/")
    where.add_argument("--src", help="converted (or float HF) model directory")
    ap.add_argument("--out", help="where the two programs are (or are exported to); default the run's exports/")
    ap.add_argument("--lengths", default="16,64,128,256,512", help="prompt lengths (<= the programs' max_seq_len)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()

    from edgeft.devices.executorch_runtime import PteRuntime
    from edgeft.devices.host_run import _set_threads
    from edgeft.exporters import pte
    from edgeft.rundir import PTE_FILES, RunDir

    src = RunDir(args.run).converted if args.run else Path(args.src)
    out = Path(args.out) if args.out else (RunDir(args.run).exports.path if args.run else None)
    if out is None:
        raise SystemExit("--src needs --out")
    exports = {}
    for mode, name in PTE_FILES.items():
        path = out / name
        if not path.exists():
            print(f"exporting {path} ...", flush=True)
            exports[mode] = pte.export(src, out, logits=mode)
        exports[mode] = {"path": str(path), "bytes": path.stat().st_size, "planned_bytes": _planned_bytes(path)}
    pool = _set_threads(args.threads)
    rts = {m: PteRuntime(e["path"]) for m, e in exports.items()}
    assert rts["all"].full_logits and not rts["last"].full_logits, "programs are not one of each mode"
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = min(rt.max_seq_len for rt in rts.values())
    lengths = [n for n in lengths if n <= max_len]
    ids = _tokens(src, max(lengths) + 33)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    rows = []
    for n in lengths:
        times: dict[str, list[float]] = {m: [] for m in rts}
        for r in range(WARMUP + args.repeats):
            order = list(rts) if r % 2 == 0 else list(reversed(rts))
            for m in order:
                t = timed(lambda rt=rts[m]: rt._step(ids[:n], 0))
                if r >= WARMUP:
                    times[m].append(t)
        med = {m: statistics.median(v) for m, v in times.items()}
        rows.append(
            {
                "prompt_tokens": n,
                **{f"{m}_ms": round(med[m] * 1000, 2) for m in rts},
                **{f"{m}_tokens_per_s": round(n / med[m], 1) for m in rts},
                "speedup": round(med["all"] / med["last"], 3),
                "all_ms_each": [round(t * 1000, 2) for t in times["all"]],
                "last_ms_each": [round(t * 1000, 2) for t in times["last"]],
            }
        )
        print(
            f"prefill {n:4d} tokens: all {med['all'] * 1000:8.1f} ms, last {med['last'] * 1000:8.1f} ms, "
            f"{med['all'] / med['last']:.2f}x",
            flush=True,
        )
    # control: decode steps after a 16-token prefill do the same work in both programs
    decode = {}
    for m, rt in rts.items():
        per = []
        for _ in range(3):
            rt._step(ids[:16], 0)
            t = timed(lambda rt=rt: [rt._step([ids[16 + i]], 16 + i) for i in range(32)])
            per.append(t / 32)
        decode[f"{m}_ms_per_token"] = round(statistics.median(per) * 1000, 2)
    print(f"decode: all {decode['all_ms_per_token']} ms/token, last {decode['last_ms_per_token']} ms/token")
    for m, e in exports.items():
        print(f"{m}: {e['bytes'] / 2**20:.1f} MiB file, {e['planned_bytes'] / 2**20:.1f} MiB planned activations")
    cpu = device()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "host": cpu,
        "versions": versions(),
        "source": str(src),
        "threads": pool,
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other jobs on the host: read the spread with it
        "max_seq_len": rts["all"].max_seq_len,
        "vocab": rts["all"].vocab_size,
        "repeats": args.repeats,
        "programs": exports,
        "prefill": rows,
        "decode": decode,
    }
    dest = result_path("pte_logits", args.tag, slug(cpu["cpu"], 40))
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
