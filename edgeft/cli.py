"""The ``edgeft`` command: thin argument parsing over the pipeline functions.

Errors a user can fix are printed as one line (``edgeft: error: ...``) with a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from typing import Any

from .errors import EdgeftError


def _quiet_backends() -> None:
    """Silence import-time chatter of optional backends (missing CUDA extensions, deprecations)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "torch.export", "executorch", "httpx", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeft", description="Fine-tune with QAT and take the model to a phone.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (LoRA or full), with QAT, then convert")
    t.add_argument("--config", help="YAML config file; flags override it")
    t.add_argument("--model", help="built-in name (see `edgeft models`), HF directory, .gguf file or hub id")
    t.add_argument("--data", help="builtin:tasks or a .jsonl/.json/.csv file (alpaca or messages format)")
    t.add_argument("--out", help="run directory (default runs/<model>-<time>)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora", help="LoRA adapters (peft)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full fine-tuning")
    t.add_argument("--lora-r", type=int)
    t.add_argument("--lora-alpha", type=int)
    t.add_argument("--lora-dropout", type=float)
    t.add_argument("--qat", help="QAT scheme or preset (see `edgeft qat list`)")
    t.add_argument("--qat-group-size", type=int)
    t.add_argument("--ptq", dest="ptq", action="store_true", default=None,
                   help="with --qat, also train without QAT for the BF16/PTQ comparison (default)")
    t.add_argument("--no-ptq", dest="ptq", action="store_false", help="skip the no-QAT baseline")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    t.add_argument("--warmup-ratio", type=float)
    t.add_argument("--max-seq-length", type=int)
    t.add_argument("--dtype", choices=["fp32", "bf16"])
    t.add_argument("--device")
    t.add_argument("--kernels", choices=["auto", "on", "off"])
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None)

    e = sub.add_parser("export", help="export a run's converted model")
    e.add_argument("format", choices=["pte", "gguf", "torchao"])
    e.add_argument("--run", help="run directory (default: newest under ./runs)")
    e.add_argument("--quant", help="GGUF type: f32, f16, bf16, q8_0, q4_0 (default: the scheme's bit width)")
    e.add_argument("--max-seq-len", type=int, help=".pte KV-cache length (default 512)")

    v = sub.add_parser("eval", help="BF16 vs PTQ vs QAT on eager, .pte and GGUF runtimes")
    v.add_argument("--run", help="run directory (default: newest under ./runs)")
    v.add_argument("--compare", type=_csv, help="variants, e.g. bf16,ptq,qat (default: all the run has)")
    v.add_argument("--runtimes", type=_csv, default=["eager", "pte", "gguf"], help="eager,pte,gguf")
    v.add_argument("--limit", type=int, default=60, help="task test questions to answer (default 60)")
    v.add_argument("--ppl-tokens", type=int, default=2048, help="held-out tokens for perplexity")

    c = sub.add_parser("convert", help="re-run QAT convert / PTQ for a run from its saved model")
    c.add_argument("--run")

    q = sub.add_parser("qat", help="QAT schemes and presets")
    q.add_argument("action", choices=["list"])

    sub.add_parser("models", help="list built-in models")
    return p


_TRAIN_KEYS = [
    "model", "data", "out", "mode", "qat", "qat_group_size", "ptq", "max_steps", "batch_size", "grad_accum", "lr",
    "weight_decay", "schedule", "warmup_ratio", "max_seq_length", "dtype", "device", "kernels", "seed", "threads",
    "progress",
]


def _train_config(args: argparse.Namespace):
    from .config import TrainConfig, load_yaml

    cfg = load_yaml(args.config) if args.config else TrainConfig()
    over: dict[str, Any] = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k, None) is not None}
    cfg = dataclasses.replace(cfg, **over)
    lora = {k: getattr(args, f"lora_{k}") for k in ("r", "alpha", "dropout") if getattr(args, f"lora_{k}") is not None}
    if lora:
        cfg.lora = dataclasses.replace(cfg.lora, **lora)
    return cfg


def _print_table(rows: list[dict[str, str]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_backends()
    logging.basicConfig(level=logging.INFO, format="edgeft: %(message)s")
    try:
        return _dispatch(args)
    except EdgeftError as e:
        print(f"edgeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeft: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline

    if args.command == "train":
        run = pipeline.train(_train_config(args))
        print(f"run: {run}")
    elif args.command == "export":
        kw: dict[str, Any] = {}
        if args.max_seq_len and args.format == "pte":
            kw["max_seq_len"] = args.max_seq_len
        if args.quant and args.format != "gguf":
            raise EdgeftError("--quant applies to gguf exports only")
        report = pipeline.export(args.format, args.run, quant=args.quant, **kw)
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2, default=str))
    elif args.command == "eval":
        from edgeft.devices.evaluate import render_markdown

        report = pipeline.evaluate(
            args.run, runtimes=args.runtimes, variants=args.compare, limit=args.limit, ppl_tokens=args.ppl_tokens
        )
        print(render_markdown(report))
        print(f"report: {report['run']}/eval/report.md")
    elif args.command == "convert":
        print(f"converted: {pipeline.convert(args.run)}")
    elif args.command == "qat":
        from edgeft.qat import describe

        _print_table(describe(), ["name", "kind", "exporters", "description"])
    elif args.command == "models":
        from .models import list_models

        _print_table([{"name": k, "description": v} for k, v in list_models().items()], ["name", "description"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
