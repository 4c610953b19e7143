"""Wall time of a whole `edgeft train --qat PRESET` run against the same fine-tune without QAT (issue 15 item 2).

The QAT run is the float twin (the fine-tune itself), its PTQ convert, the QAT run (its steps by the preset's recipe)
and the QAT convert; the reference is the same `edgeft train` without `--qat` (the fine-tune and its save). Both are
real CLI runs (subprocesses) on a random-init model of a public checkpoint's shape (bench/train_throughput.py's
MODELS), the tokenizer of the built-in tiny-qwen3 (the config's vocabulary is the checkpoint's), `builtin:tasks`
packed into rows of --max-seq-length. Reports both walls, their ratio (target <= 2x), and each stage's training
seconds from the runs' own records.

    python bench/qat_wall.py --model qwen3-0.6b --max-steps 400 --batch-size 4 --max-seq-length 2048

Writes ``bench/results/qat_wall-<date>-<device>[-tag].json`` and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import header, result_path  # noqa: E402
from train_throughput import MODELS, _config, _reinit  # noqa: E402


def build_model(name: str, dest: Path, seed: int = 0) -> Path:
    """A random-init checkpoint of ``name``'s shape with tiny-qwen3's tokenizer, saved in bf16 under ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.models import load_model, resolve_model

    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _, tok = load_model(resolve_model("tiny-qwen3"))
    cfg = _config(name)
    cfg.use_cache = True
    cfg.vocab_size = max(cfg.vocab_size, len(tok))  # the checkpoint's (larger) vocabulary; the smoke shape's is not
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    _reinit(model, seed, "cpu")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def train(model: Path, out: Path, extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "edgeft",
        "train",
        "--model",
        str(model),
        "--data",
        "builtin:tasks",
        "--packing",
        "--max-seq-length",
        str(args.max_seq_length),
        "--batch-size",
        str(args.batch_size),
        "--max-steps",
        str(args.max_steps),
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    from edgeft.rundir import RunDir

    run = RunDir(out)
    info = run.info()
    row = {"command": cmd[2:], "wall_s": wall, "train_s": (info.get("train") or {}).get("seconds")}
    if run.baseline.has_trained_model():
        row["twin_train_s"] = (run.baseline.info().get("train") or {}).get("seconds")
    from edgeft.config import load_yaml

    q = load_yaml(run.config_file).qat
    row["qat_steps"] = q.max_steps if q.scheme else None
    row["log_tail"] = proc.stderr.strip().splitlines()[-12:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODELS))
    ap.add_argument("--qat", default="phone-deployment")
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/qat_wall", help="model and run directories")
    ap.add_argument(
        "--extra", default="", help="more `edgeft train` flags for both runs, space-separated (--extra=--full)"
    )
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from edgeft.fsutil import write_json

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, work / f"model-{args.model}")
    extra = args.extra.split()
    dest = result_path("qat_wall", args.tag)
    out = {**header("qat_wall"), "settings": {k: v for k, v in vars(args).items() if k != "work"}, "target": 2.0}
    ft = train(model, work / "ft", extra, args)
    out["fine_tune"] = ft
    write_json(dest, out)  # a run cut off in the QAT run still keeps the fine-tune's wall
    print(f"fine-tune: {ft['wall_s']:.1f} s wall, {ft['train_s']:.1f} s training", flush=True)
    qat = train(model, work / "qat", ["--qat", args.qat, *extra], args)
    ratio = qat["wall_s"] / ft["wall_s"]
    out.update(qat_run=qat, wall_ratio=ratio)
    write_json(dest, out)
    print(f"\n{args.model}, builtin:tasks packed {args.batch_size} x {args.max_seq_length}, {args.max_steps} steps")
    print("| run | wall s | train s (twin / QAT) | QAT steps |")
    print("|---|---|---|---|")
    print(f"| fine-tune | {ft['wall_s']:.1f} | {ft['train_s']:.1f} | - |")
    print(
        f"| --qat {args.qat} | {qat['wall_s']:.1f} | {qat.get('twin_train_s') or 0:.1f} / {qat['train_s']:.1f} | "
        f"{qat['qat_steps']} |"
    )
    print(f"wall ratio {ratio:.2f}x (target <= 2.0x); wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
