"""Host inference speed: the run's ``.pte`` on ExecuTorch next to its GGUF on llama.cpp, same host, same bits.

What is compared (each engine in its own process, all loaded and warmed up, then their generations interleaved
one at a time with the order rotating, so no two thread pools run together and the load other processes put on
the host falls on every engine alike):

- ``pte runner``: ``model.pte`` (phone-deployment: int8 per-token dynamic activations x int4 weights in groups
  of 32 on XNNPACK, int8 embedding) through ExecuTorch's ``TextLLMRunner``, the runner the Android/iOS apps
  wrap (``edgeft run``). Timed with the host clock at each streamed token (the runner's own stats, in whole
  milliseconds, are recorded too).
- ``pte loop``: the same program through ExecuTorch's Python runtime (``PteRuntime``), token by token from
  Python: the same harness as the llama.cpp row, so the runner's own overhead shows.
- ``gguf q4_0``: the run's ``model-q4_0.gguf`` through llama-cpp-python (``Llama.eval`` token by token; Q4_0:
  4-bit weights in blocks of 32 with one fp16 scale, activations quantized to 8 bits inside the dot products,
  the same bit widths as 8da4w). llama.cpp's own ``llama_perf_context`` times are recorded too.
- ``gguf q8_0`` (when the run has it): for scale only; there is no int8-weight ``.pte`` to pair it with.

Same prompt (raw text, no chat template, identical token ids: the HF tokenizer's ids are fed to llama.cpp and
the runner's own tokenization is checked to give the same count), greedy, the same number of new tokens for every
engine (llama.cpp ignores EOS; the runner cannot, so the prompt is prose that it continues past the count, and a
run where it stops early is refused), one warm-up generation each, then the median of ``--repeats``. Prefill =
prompt tokens / time from the start of the call to the first new token; decode = (new tokens - 1) / time from
the first to the last new token. Every engine gets the same thread count (ExecuTorch's threadpool resized with
``_unsafe_reset_threadpool``; llama.cpp ``n_threads`` = ``n_threads_batch``); ``--threads 1,2`` measures each.

    python bench/host_decode.py --run /tmp/demo-run            # an existing run (exports/ with .pte and GGUFs)
    python bench/host_decode.py                                # trains + exports a small smollm2-135m run first

Writes ``bench/results/host_decode-<date>-<cpu>.json`` (date, CPU model and cores, versions) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import device, result_path, slug, versions  # noqa: E402

from edgeft.rundir import RunDir  # noqa: E402

PROMPT = (
    "The history of the old harbour town begins in the twelfth century, when fishermen from the northern coast "
    "settled on the sheltered bay. Over the next three hundred years"
)


# ----------------------------------------------------------------------------------------------- workers


def _ids(tokenizer_json: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids


def _summary(reps: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in reps) for k in ("prefill_s", "decode_s")}
    r0 = reps[0]
    return {
        "prompt_tokens": r0["prompt_tokens"],
        "new_tokens": r0["new_tokens"],
        "prefill_ms": med["prefill_s"] * 1000,
        "prefill_tokens_per_s": r0["prompt_tokens"] / med["prefill_s"],
        "decode_tokens_per_s": (r0["new_tokens"] - 1) / med["decode_s"],
        "decode_ms_per_token": med["decode_s"] / (r0["new_tokens"] - 1) * 1000,
        "decode_tokens_per_s_all": [round((r["new_tokens"] - 1) / r["decode_s"], 2) for r in reps],
        "repeats": reps,
    }


def _setup_pte_runner(spec: dict):
    from edgeft.devices.executorch_runtime import load_executorch_ops
    from edgeft.devices.host_run import _set_threads

    pte = Path(spec["artifact"])
    n_prompt = len(_ids(pte.parent / "tokenizer.json", spec["prompt"]))
    load_executorch_ops()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    threads = _set_threads(spec["threads"])
    runner = TextLLMRunner(str(pte), str(pte.parent))
    cfg = GenerationConfig(echo=False, max_new_tokens=spec["new_tokens"], temperature=0.0, num_bos=0, num_eos=0)

    def once() -> dict:
        runner.reset()  # position 0 again: the KV cache is overwritten from the start
        times: list[float] = []
        pieces: list[str] = []
        stats: dict = {}

        def on_piece(p: str) -> None:
            times.append(time.perf_counter())
            pieces.append(p)

        t0 = time.perf_counter()
        runner.generate(
            spec["prompt"],
            cfg,
            token_callback=on_piece,
            stats_callback=lambda s: stats.update(json.loads(s.to_json_string())),
        )
        if len(times) != spec["new_tokens"]:
            raise SystemExit(
                f"the runner stopped after {len(times)} of {spec['new_tokens']} tokens (EOS): "
                "choose a prompt it continues further"
            )
        if stats["prompt_tokens"] != n_prompt:
            raise SystemExit(
                f"the runner tokenized the prompt into {stats['prompt_tokens']} tokens, the HF "
                f"tokenizer into {n_prompt}"
            )
        return {
            "prompt_tokens": n_prompt,
            "new_tokens": len(times),
            "prefill_s": times[0] - t0,
            "decode_s": times[-1] - times[0],
            "runner_stats_prefill_ms": stats["prompt_eval_end_ms"] - stats["inference_start_ms"],
            "runner_stats_decode_ms": stats["inference_end_ms"] - stats["prompt_eval_end_ms"],
            "text_head": "".join(pieces)[:100],
        }

    return once, {"threads": threads}


def _setup_pte_loop(spec: dict):
    import torch

    from edgeft.devices.executorch_runtime import PteRuntime
    from edgeft.devices.host_run import _set_threads

    pte = Path(spec["artifact"])
    ids = _ids(pte.parent / "tokenizer.json", spec["prompt"])
    torch.set_num_threads(1)
    threads = _set_threads(spec["threads"])
    rt = PteRuntime(pte)

    def once() -> dict:
        times = []
        out: list[int] = []
        t0 = time.perf_counter()
        last = rt._prefill(ids)[-1]
        while True:
            tok = int(torch.argmax(last))
            times.append(time.perf_counter())
            out.append(tok)
            if len(out) == spec["new_tokens"]:
                break
            last = rt._step([tok], len(ids) + len(out) - 1)[-1]
        return {
            "prompt_tokens": len(ids),
            "new_tokens": len(out),
            "prefill_s": times[0] - t0,
            "decode_s": times[-1] - times[0],
        }

    return once, {"threads": threads}


def _setup_gguf(spec: dict):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    path = Path(spec["artifact"])
    ids = _ids(path.parent / "tokenizer.json", spec["prompt"])
    n_ctx = len(ids) + spec["new_tokens"] + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def once() -> dict:
        llm.reset()  # n_tokens = 0: the next eval drops the KV cache
        llama_cpp.llama_perf_context_reset(ctx)
        times = []
        out: list[int] = []
        t0 = time.perf_counter()
        llm.eval(ids)
        while True:
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            times.append(time.perf_counter())
            out.append(tok)
            if len(out) == spec["new_tokens"]:
                break
            llm.eval([tok])
        perf = llama_cpp.llama_perf_context(ctx)
        return {
            "prompt_tokens": len(ids),
            "new_tokens": len(out),
            "prefill_s": times[0] - t0,
            "decode_s": times[-1] - times[0],
            "llama_perf_prefill_ms": perf.t_p_eval_ms,
            "llama_perf_decode_ms": perf.t_eval_ms,
            "llama_perf_n_decode": perf.n_eval,
            "text_head": llm.detokenize(out).decode("utf-8", "replace")[:100],
        }

    return once, {"threads": int(llm.n_threads)}


SETUPS = {
    "pte runner": _setup_pte_runner,
    "pte loop": _setup_pte_loop,
    "gguf q4_0": _setup_gguf,
    "gguf q8_0": _setup_gguf,
}


def _worker(spec: dict) -> None:
    """Load and warm up, then one timed generation per 'go' line on stdin; results as 'REP {json}' lines."""
    from edgeft.devices.host_run import _runner_output

    with _runner_output(False):  # the runtimes' native logs off; sys.stdout still reaches the driver
        once, info = SETUPS[spec["engine"]](spec)
        once()  # warm-up
        print("READY " + json.dumps(info), flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            print("REP " + json.dumps(once()), flush=True)


# ----------------------------------------------------------------------------------------------- driver


class _Worker:
    """One engine in its own process, loaded and warmed up, timing one generation per request."""

    def __init__(self, spec: dict) -> None:
        import tempfile

        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        self.spec = spec
        self.err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
            cwd=HERE.parent,
        )
        self.info = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.p.wait()
                self.err.seek(0)
                tail = (self.err.read().strip().splitlines() or ["no output"])[-1]
                raise SystemExit(f"{self.spec['engine']} failed: {tail}")
            if line.startswith(prefix):
                return line[len(prefix) :]

    def once(self) -> dict:
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return json.loads(self._expect("REP "))

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        self.err.close()


def _build_run() -> Path:
    """A small phone-deployment run of smollm2-135m with its .pte and Q4_0/Q8_0 GGUFs (about 15 min on 2 cores)."""
    out = HERE.parent / "runs" / "host-decode"
    edgeft = [sys.executable, "-m", "edgeft"]
    if not RunDir(out).is_run():
        subprocess.run(
            edgeft
            + [
                "train",
                "--model",
                "smollm2-135m",
                "--data",
                "builtin:tasks",
                "--qat",
                "phone-deployment",
                "--max-steps",
                "20",
                "--no-ptq",
                "--out",
                str(out),
                "--no-progress",
            ],
            check=True,
        )
    ex = RunDir(out).exports
    if not ex.pte().exists():
        subprocess.run(edgeft + ["export", "pte", "--run", str(out)], check=True)
    for q in ("q4_0", "q8_0"):
        if not ex.gguf(q).exists():
            subprocess.run(edgeft + ["export", "gguf", "--run", str(out), "--quant", q], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--run", help="run directory with exports/model.pte and exports/model-q4_0.gguf (default: build one)"
    )
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma list, e.g. 1,2 (default: all CPUs)")
    ap.add_argument("--engines", default="pte runner,pte loop,gguf q4_0,gguf q8_0")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        _worker(json.loads(args.worker))
        return

    run = Path(args.run) if args.run else _build_run()
    ex = RunDir(run).exports
    files = {"pte runner": ex.pte(), "pte loop": ex.pte(), "gguf q4_0": ex.gguf("q4_0"), "gguf q8_0": ex.gguf("q8_0")}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in files:
            raise SystemExit(f"unknown engine {e!r} ({', '.join(files)})")
        if not files[e].exists() and e != "gguf q8_0":
            raise SystemExit(f"{files[e]} is missing: export it first")
    engines = [e for e in engines if files[e].exists()]
    manifest = ex.read_manifest()
    load_before = os.getloadavg()
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        # every engine loaded and warmed up, then the repeats interleaved (engine order rotating), so that the
        # host's load, which other processes move, falls on all engines alike
        workers = {}
        try:
            for e in engines:
                workers[e] = _Worker(
                    {
                        "engine": e,
                        "artifact": str(files[e]),
                        "prompt": args.prompt,
                        "new_tokens": args.new_tokens,
                        "threads": threads,
                    }
                )
            reps: dict[str, list[dict]] = {e: [] for e in engines}
            for i in range(args.repeats):
                for e in engines[i % len(engines) :] + engines[: i % len(engines)]:
                    reps[e].append(workers[e].once())
        finally:
            for w in workers.values():
                w.close()
        for e in engines:
            r = _summary(reps[e])
            print(
                f"{e} ({threads} threads): decode {r['decode_tokens_per_s']:.1f} tokens/s, prefill "
                f"{r['prefill_tokens_per_s']:.0f} tokens/s",
                file=sys.stderr,
            )
            rows.append(
                {
                    "engine": e,
                    "artifact": files[e].name,
                    "bytes": files[e].stat().st_size,
                    "threads_requested": threads,
                    **workers[e].info,
                    **r,
                }
            )
    cpu = device()
    result = {
        "bench": "host_decode",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": cpu,
        "versions": versions(),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },  # other processes on the host
        "run": str(run),
        "scheme": (manifest.get("pte") or {}).get("scheme"),
        "settings": {
            "prompt": args.prompt,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": 1,
            "greedy": True,
            "threads": args.threads,
            "interleaved": True,
        },
        "rows": rows,
    }
    out = result_path("host_decode", args.tag, slug(cpu["cpu"]))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out.relative_to(HERE.parent)}")
    print(
        f"{cpu['cpu']}, {cpu['usable_cpus']} CPUs (load average {load_before[0]:.1f}); "
        f"prompt {rows[0]['prompt_tokens']} tokens, "
        f"{args.new_tokens} new tokens, greedy, median of {args.repeats}"
    )
    base = {r["threads_requested"]: r["decode_tokens_per_s"] for r in rows if r["engine"] == "gguf q4_0"}
    print(
        f"{'engine':<12} {'artifact':<16} {'MB':>6} {'threads':>7} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'ms/token':>8} {'vs q4_0':>7}"
    )
    for r in rows:
        vs = r["decode_tokens_per_s"] / base[r["threads_requested"]] if r["threads_requested"] in base else None
        print(
            f"{r['engine']:<12} {r['artifact']:<16} {r['bytes'] / 1e6:>6.1f} {r['threads']:>7} "
            f"{r['prefill_tokens_per_s']:>13.0f} {r['decode_tokens_per_s']:>12.1f} {r['decode_ms_per_token']:>8.2f} "
            f"{(f'{vs:.2f}x' if vs else '-'):>7}"
        )


if __name__ == "__main__":
    main()
