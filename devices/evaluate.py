"""The evaluator: BF16 vs PTQ vs QAT, measured on the runtimes a device uses.

Variants of a run (see edgeft.pipeline):
- ``bf16``: the float model trained *without* QAT (``baseline/``; a run without QAT: its own model);
- ``ptq``: that same model quantized with the run's scheme after training (``baseline/converted``);
- ``qat``: the model trained with fake quantization, converted (``converted/``).

Metrics: perplexity on the packaged held-out text, exact-match accuracy on the ``builtin:tasks`` test split
(greedy decoding), artifact size, and host generation speed. Runtimes: ``eager`` (PyTorch), ``pte``
(ExecuTorch) and ``gguf`` (llama.cpp, at the scheme's bit width: Q4_0 for int4 schemes, Q8_0 for int8,
F16 for float). The report states how much of PTQ's degradation QAT recovered:
(PTQ − QAT) / (PTQ − BF16) for perplexity, (QAT − PTQ) / (BF16 − PTQ) for accuracy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path, write_json, write_text

from .runtimes import Runtime, load_runtime

RUNTIMES = ("eager", "pte", "gguf")
VARIANTS = ("bf16", "ptq", "qat")


def heldout_text() -> str:
    """The packaged held-out prose (comment lines removed)."""
    from importlib import resources

    text = resources.files("edgeft").joinpath("assets/heldout.txt").read_text(encoding="utf-8")
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")).strip()


def perplexity(rt: Runtime, chunks: list[list[int]]) -> float:
    """exp(mean next-token NLL) over all predicted positions of the chunks, each from a fresh context."""
    nll, n = 0.0, 0
    for ids in chunks:
        logits = rt.logits(ids)[:-1].double()
        target = torch.tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        n += len(ids) - 1
    return math.exp(nll / n)


def text_chunks(tokenizer: Any, text: str, n_tokens: int, chunk: int) -> list[list[int]]:
    """Split the first ``n_tokens`` of ``text`` into chunks, each starting with the BOS the tokenizer adds."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # BOS when the tokenizer adds one
    step = chunk - len(prefix)
    return [prefix + ids[i : i + step] for i in range(0, len(ids), step) if len(ids[i : i + step]) > 1]


def exact_match(rt: Runtime, tokenizer: Any, rows: list[dict[str, str]], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answers vs exact answers; also generated tokens per second (prefill included)."""
    from edgeft.data import encode_prompt, tasks

    stop = {tokenizer.eos_token_id}
    correct, n_tok, secs, samples = 0, 0, 0.0, []
    for r in rows:
        prompt = encode_prompt(tokenizer, tasks.to_messages(r)[:1])
        t0 = time.perf_counter()
        out = rt.generate(prompt, max_new_tokens, stop)
        secs += time.perf_counter() - t0
        n_tok += max(1, len(out))
        answer = tokenizer.decode(out, skip_special_tokens=True).strip()
        ok = answer == r["answer"]
        correct += ok
        if len(samples) < 5:
            samples.append({"question": r["question"], "expected": r["answer"], "got": answer})
    return {"accuracy": correct / len(rows), "n": len(rows), "tokens_per_s": n_tok / secs, "samples": samples}


def _variant_sources(run: Path) -> dict[str, tuple[Path, Path]]:
    """(model directory, artifact directory) of each variant this run has."""
    from edgeft.pipeline import float_dir

    out: dict[str, tuple[Path, Path]] = {}
    base = run / "baseline"
    if (base / "converted" / "scheme.json").exists():
        out["bf16"] = (float_dir(base), base / "exports" / "float")
        out["ptq"] = (base / "converted", base / "exports")
    record = json.loads((run / "converted" / "scheme.json").read_text())
    if record.get("plan"):
        out["qat"] = (run / "converted", run / "exports")
    elif "bf16" not in out:
        out["bf16"] = (run / "converted", run / "exports")
    return out


def _artifact(kind: str, src: Path, out_dir: Path, max_seq_len: int) -> Path:
    """Export the variant's artifact for a runtime once (an existing, validated one is reused)."""
    from edgeft import pipeline

    if kind == "pte":
        path = out_dir / "model.pte"
        if not path.exists():
            pipeline.export_dir("pte", src, out_dir, max_seq_len=max_seq_len)
        return path
    quant = pipeline.default_gguf_quant(src)
    path = out_dir / f"model-{quant}.gguf"
    if not path.exists():
        pipeline.export_dir("gguf", src, out_dir, quant=quant)
    return path


def _size(kind: str, src: Path, artifact: Path | None) -> int:
    if artifact is not None:
        return artifact.stat().st_size
    return sum(f.stat().st_size for f in src.glob("*.safetensors"))


def evaluate_run(
    run: Path,
    runtimes: tuple[str, ...] | list[str] = RUNTIMES,
    variants: tuple[str, ...] | list[str] | None = None,
    limit: int = 60,
    ppl_tokens: int = 2048,
    ppl_chunk: int = 256,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every variant on every runtime; writes eval/report.{md,json} and eval/metrics.png."""
    from transformers import AutoTokenizer

    from edgeft.data import tasks

    for r in runtimes:
        if r not in RUNTIMES:
            raise EdgeftError(f"unknown runtime {r!r}; choose from {', '.join(RUNTIMES)}")
    if not (run / "converted" / "scheme.json").exists():
        raise EdgeftError(f"{run} has no converted model; run `edgeft train` to completion first")
    sources = _variant_sources(run)
    if variants:
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise EdgeftError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        missing = [v for v in variants if v not in sources]
        if missing:
            raise EdgeftError(f"{run} has no {', '.join(missing)} variant (train with --qat and --ptq to get all three)")
        sources = {v: sources[v] for v in variants}
    tokenizer = AutoTokenizer.from_pretrained(str(run / "converted"))
    chunks = text_chunks(tokenizer, heldout_text(), ppl_tokens, ppl_chunk)
    rows = tasks.generate("test")[:limit]
    max_seq_len = max(ppl_chunk, 256)

    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources) * len(runtimes), desc="eval", unit="run", dynamic_ncols=True)
    for variant, (src, art_dir) in sources.items():
        for kind in runtimes:
            if bar is not None:
                bar.set_postfix_str(f"{variant}/{kind}")
            artifact = None if kind == "eager" else _artifact(kind, src, art_dir, max_seq_len)
            rt = load_runtime(kind, artifact or src)
            try:
                t0 = time.perf_counter()
                ppl = perplexity(rt, chunks)
                em = exact_match(rt, tokenizer, rows, max_new_tokens)
            finally:
                rt.close()
            results.append(
                {
                    "variant": variant,
                    "runtime": kind,
                    "artifact": str(artifact or src),
                    "size_mb": _size(kind, src, artifact) / 2**20,
                    "perplexity": ppl,
                    "accuracy": em["accuracy"],
                    "n_tasks": em["n"],
                    "tokens_per_s": em["tokens_per_s"],
                    "seconds": time.perf_counter() - t0,
                    "samples": em["samples"],
                }
            )
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report = _report(run, results, ppl_tokens=sum(len(c) - 1 for c in chunks), limit=len(rows))
    out = run / "eval"
    out.mkdir(exist_ok=True)
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    _plot(report, out / "metrics.png")
    return report


def recovery(bf16: float, ptq: float, qat: float, higher_is_better: bool) -> float | None:
    """Share of PTQ's degradation that QAT recovered; None when PTQ did not degrade."""
    gap = (bf16 - ptq) if higher_is_better else (ptq - bf16)
    if gap <= 1e-12:
        return None
    gain = (qat - ptq) if higher_is_better else (ptq - qat)
    return gain / gap


def _report(run: Path, results: list[dict[str, Any]], ppl_tokens: int, limit: int) -> dict[str, Any]:
    from edgeft.pipeline import run_config

    cfg = run_config(run)
    rec: dict[str, Any] = {}
    by = {(r["variant"], r["runtime"]): r for r in results}
    for rt in {r["runtime"] for r in results}:
        if all((v, rt) in by for v in VARIANTS):
            b, p, q = (by[(v, rt)] for v in VARIANTS)
            rec[rt] = {
                "perplexity": recovery(b["perplexity"], p["perplexity"], q["perplexity"], higher_is_better=False),
                "accuracy": recovery(b["accuracy"], p["accuracy"], q["accuracy"], higher_is_better=True),
            }
    return {
        "run": str(run),
        "model": cfg.model,
        "data": cfg.data,
        "qat": cfg.qat,
        "mode": cfg.mode,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "heldout_tokens": ppl_tokens,
        "task_examples": limit,
        "results": results,
        "recovery": rec,
    }


def _pct(x: float | None) -> str:
    return "n/a (PTQ did not degrade)" if x is None else f"{100 * x:.0f}%"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# edgeft evaluation: {report['model']} ({report['mode']}, QAT {report['qat'] or 'none'})",
        "",
        f"Perplexity on {report['heldout_tokens']} held-out tokens; exact-match accuracy on "
        f"{report['task_examples']} `builtin:tasks` test questions (greedy).",
        "",
        "| variant | runtime | perplexity | accuracy | size (MB) | tokens/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['perplexity']:.3f} | {100 * r['accuracy']:.1f}% "
            f"| {r['size_mb']:.1f} | {r['tokens_per_s']:.1f} |"
        )
    lines.append("")
    for rt, rec in report["recovery"].items():
        lines.append(
            f"- {rt}: QAT recovered {_pct(rec['perplexity'])} of PTQ's perplexity degradation "
            f"and {_pct(rec['accuracy'])} of its accuracy loss."
        )
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    runtimes = sorted({r["runtime"] for r in results}, key=RUNTIMES.index)
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    width = 0.8 / max(1, len(variants))
    for ax, metric, label in [(axes[0], "perplexity", "perplexity (lower is better)"), (axes[1], "accuracy", "exact match (higher is better)")]:
        for i, v in enumerate(variants):
            vals = [next((r[metric] for r in results if r["variant"] == v and r["runtime"] == rt), float("nan")) for rt in runtimes]
            ax.bar([x + i * width for x in range(len(runtimes))], vals, width, label=v)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(runtimes))], runtimes)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{report['model']}: BF16 vs PTQ vs QAT ({report['qat'] or 'no QAT'})")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
