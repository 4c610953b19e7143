"""The ``edgeft`` command: thin argument parsing over the pipeline functions.

Errors a user can fix are printed as one line (``edgeft: error: ...``) with a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import re
import sys
import warnings
from typing import Any

from .errors import EdgeftError


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how writers that wrap the OS error say it (safetensors: "os error 28", torch.save: "file write failed", numpy's
# tofile in gguf-py: "N requested and M written")
_DISK_FULL_TEXT = re.compile(r"No space left on device|File too large|Disk quota exceeded|os error (?:28|27|122)\b|"
                             r"file write failed|\d+ requested and \d+ written")


def _disk_full(e: BaseException) -> str | None:
    """A one-line description when ``e`` (or what it wraps) is a write that found the disk full, else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return f"{e.strerror or os.strerror(e.errno)}" + (f" writing {e.filename}" if e.filename else "")
        m = _DISK_FULL_TEXT.search(str(e))
        if m:
            return f"a write failed, the disk is full ({m.group(0)})"
        e = e.__cause__ or e.__context__
    return None


def _quiet_backends() -> None:
    """Silence import-time chatter of optional backends (missing CUDA extensions, deprecations)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "torch.export", "executorch", "httpx", "bitsandbytes",
                 "gguf"):
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


# exporters.gguf.QUANTS, spelled here so that `--help` does not import the exporter (a test keeps them equal)
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (the usage is in --help), like every other edgeft error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeft", description="Fine-tune with QAT and take the model to a phone.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (LoRA or full), with QAT, then convert")
    t.add_argument("--config", help="YAML config file; flags override it")
    t.add_argument("--model", help="built-in name (see `edgeft models`), HF directory, .gguf file or hub id")
    t.add_argument("--out", help="run directory (default runs/<model>-<time>)")
    t.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest checkpoint (its config.yaml is the default)")
    t.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run in --out")
    d = t.add_argument_group("data")
    d.add_argument("--data", help="builtin:tasks, a .jsonl/.json/.csv/.tsv/.parquet/.txt file, or a hub dataset name")
    d.add_argument("--data-split", help="split of a hub dataset (default train)")
    d.add_argument("--chat-template", help="chat template from the registry (see `edgeft templates`); "
                                           "default: the model's own")
    d.add_argument("--system-prompt", help="system prompt for conversations that have none")
    d.add_argument("--prompt-template", help="merge columns: 'Age {Age}.[[ Fare {Fare}.]]' ([[ ]]: optional)")
    d.add_argument("--output-column", help="with --prompt-template: the column to learn to answer")
    d.add_argument("--conversation-extension", type=int, help="merge N rows into one multi-turn conversation")
    d.add_argument("--max-seq-length", type=int)
    d.add_argument("--packing", action="store_true", default=None, help="pack examples into max-seq-length rows")
    d.add_argument("--no-padding-free", dest="padding_free", action="store_false", default=None,
                   help="right-pad micro-batches instead of flattening them")
    d.add_argument("--eval-split", type=float, help="held-out share (<1) or count of examples for eval loss")
    d.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: 10 times per run)")
    d.add_argument("--early-stopping-patience", type=int, help="stop after N evaluations without improvement")
    d.add_argument("--early-stopping-threshold", type=float, help="minimum eval-loss improvement (default 0)")
    d.add_argument("--no-load-best", dest="load_best", action="store_false", default=None,
                   help="save the last weights, not the best-eval ones")
    m = t.add_argument_group("model")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="mode", action="store_const", const="lora", help="LoRA adapters (peft)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="full fine-tuning")
    m.add_argument("--lora-r", type=int)
    m.add_argument("--lora-alpha", type=int)
    m.add_argument("--lora-dropout", type=float)
    m.add_argument("--lora-bias", choices=["none", "all", "lora_only"])
    m.add_argument("--lora-target-modules", type=_csv,
                   help="all-linear (default), a list, or e.g. all-linear,lm_head,embed_tokens")
    m.add_argument("--lora-modules-to-save", type=_csv, help="modules trained in full next to the adapters")
    m.add_argument("--rslora", dest="use_rslora", action="store_true", default=None, help="rank-stabilised LoRA")
    m.add_argument("--adapter", help="continue training a saved LoRA adapter (PEFT directory or edgeft run)")
    m.add_argument("--load-in-4bit", action="store_true", default=None, help="QLoRA: NF4 base (bitsandbytes)")
    m.add_argument("--load-in-8bit", action="store_true", default=None, help="8-bit base (bitsandbytes)")
    m.add_argument("--qat", help="QAT scheme or preset (see `edgeft qat list`)")
    m.add_argument("--qat-group-size", type=int)
    m.add_argument("--qat-weight-scale", choices=["absmax", "mse", "learned", "learned-mse"],
                   help="how int4 weight groups choose their scale: absmax (torchao's, default), mse (least squared "
                   "error of 13 fractions of max|w|, in training and convert; the PTQ baseline uses it too), or "
                   "learned / learned-mse (trained with the weights from absmax / mse scales; --qat-scale-lr)")
    m.add_argument("--qat-int8", type=_csv, metavar="NAMES",
                   help="linears kept at int8 per output channel in an int4 scheme, by name: e.g. gate_proj,up_proj "
                   "(the scheme's activations; exported as such to .pte, GGUF Q8_0 and TorchAO)")
    m.add_argument("--ptq", dest="ptq", action="store_true", default=None,
                   help="with --qat, also train without QAT for the BF16/PTQ comparison (default)")
    m.add_argument("--no-ptq", dest="ptq", action="store_false", help="skip the no-QAT baseline")
    m.add_argument("--qat-distill", type=float, metavar="W",
                   help="with --qat: KL weight of distilling the trained no-QAT twin into the QAT model, 0-1 "
                        "(default 1: the QAT model learns to reproduce the float model; 0: labels only)")
    m.add_argument("--qat-distill-positions", choices=["all", "targets"],
                   help="with --qat-distill: distil every position (all, default) or only the labelled ones "
                        "(targets: your data's answers and the --qat-corpus prose)")
    m.add_argument("--qat-distill-temperature", type=float, metavar="T", help="temperature of the KL (default 1)")
    m.add_argument("--qat-init", choices=["baseline", "pretrained"],
                   help="with --qat: start QAT from the twin's fine-tuned weights (baseline, default) or from the "
                        "pretrained model")
    m.add_argument("--qat-corpus", type=float, metavar="SHARE",
                   help="with --qat: share of the QAT run's training examples drawn from edgeft's packaged generic "
                        "prose, so the quantized model follows the float one beyond your data (default 0.25 when "
                        "distilling, else 0)")
    m.add_argument("--dtype", choices=["fp32", "bf16"])
    m.add_argument("--device")
    m.add_argument("--kernels", choices=["auto", "on", "off"])
    m.add_argument("--gradient-checkpointing", choices=["auto", "off", "plain", "offload"],
                   help="auto (default): none when the activations fit the GPU, else plain (each layer's input "
                        "kept on the GPU), else offload (kept in pinned host memory); off: never")
    m.add_argument("--distributed", choices=["auto", "ddp", "fsdp"],
                   help="under torchrun: ddp (a replica per GPU), fsdp (FSDP2, sharded: models that do not fit one "
                        "GPU) or auto (fsdp when DDP would not fit; default)")
    m.add_argument("--fsdp", dest="distributed", action="store_const", const="fsdp", help="--distributed fsdp")
    o = t.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int)
    o.add_argument("--epochs", type=float, help="train this many epochs (sets max-steps)")
    o.add_argument("--batch-size", type=int, help="examples (packed rows) per micro-batch and process")
    o.add_argument("--grad-accum", type=int)
    o.add_argument("--optim", choices=["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "sgd"])
    o.add_argument("--lr", type=float)
    o.add_argument("--embedding-lr", type=float, help="learning rate of embed_tokens/lm_head parameters")
    o.add_argument("--qat-lr", type=float, help="learning rate of the QAT run (default: --lr, at least 1e-4 when "
                                                "QAT starts from the twin)")
    o.add_argument("--qat-scale-lr", type=float, help="learning rate of learned QAT scales, in log space "
                                                      "(default 5e-3 with --qat-weight-scale learned)")
    o.add_argument("--qat-max-steps", type=int, help="optimizer steps of the QAT run (default: --max-steps; the "
                                                     "no-QAT twin trains --max-steps)")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    o.add_argument("--warmup-ratio", type=float)
    o.add_argument("--warmup-steps", type=int, help="overrides --warmup-ratio")
    o.add_argument("--max-grad-norm", type=float)
    o.add_argument("--seed", type=int)
    o.add_argument("--threads", type=int, help="torch CPU threads")
    c = t.add_argument_group("checkpoints and logging")
    c.add_argument("--save-steps", type=int, help="checkpoint every N steps and at the end (0: none)")
    c.add_argument("--save-total-limit", type=int, help="keep the newest K checkpoints (and the best)")
    c.add_argument("--report-to", type=_csv, help="tensorboard,wandb")
    c.add_argument("--logging-steps", type=int, help="log-line interval without a progress bar")
    c.add_argument("--no-progress", dest="progress", action="store_false", default=None)

    e = sub.add_parser("export", help="export a run's converted model")
    e.add_argument("format", choices=["pte", "gguf", "torchao"])
    e.add_argument("--run", help="run directory (default: newest under ./runs)")
    e.add_argument("--quant", help=f"GGUF type: {', '.join(GGUF_QUANTS)} (default: the scheme's bit width; the "
                                   "K-quants through llama.cpp)")
    e.add_argument("--max-seq-len", type=int, help=".pte KV-cache length (default 512)")
    e.add_argument("--logits", choices=["all", "last"],
                   help=".pte output: logits for every position (all, default: model.pte, what `edgeft eval` runs) "
                        "or the last one only (last: model-last.pte, for apps; less prefill work and memory)")

    v = sub.add_parser(
        "eval", help="BF16 vs PTQ vs QAT on eager, .pte and GGUF runtimes",
        description="Perplexity, exact-match and multiple-choice accuracy (length-normalised log-likelihood: mean "
                    "log-probability per answer token, end-of-turn included), size and decode speed of each variant "
                    "on each runtime. Default data: packaged held-out prose and the builtin:tasks test split (with "
                    "3 seeded distractors per question for multiple choice); --data swaps in your own.",
    )
    v.add_argument("--run", help="run directory (default: newest under ./runs)")
    v.add_argument("--compare", type=_csv, help="variants, e.g. bf16,ptq,qat (default: all the run has)")
    v.add_argument("--runtimes", type=_csv, default=["eager", "pte", "gguf"], help="eager,pte,gguf")
    v.add_argument("--limit", type=int, default=60, help="task test questions to answer (default 60)")
    v.add_argument("--ppl-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    v.add_argument("--data", action="append", metavar="FILE",
                   help="your evaluation data (repeatable): a .txt file is held-out text for perplexity; a .jsonl "
                        "file holds tasks, one JSON object a line: {\"prompt\" (or \"question\"), \"answer\"} is "
                        "scored by exact match of the greedy answer, {\"prompt\", \"choices\": [...], \"answer\": "
                        "index or choice text} by multiple choice; prompts get the run's chat template. What a file "
                        "supplies replaces the built-in set of that kind, whole (--limit caps built-in questions only)")
    v.add_argument("--check", metavar="GOLDEN.json", help="fail (exit 1, one line per metric) on drift from golden numbers")
    v.add_argument("--write-golden", metavar="PATH", help="write this evaluation as a golden file")

    d = sub.add_parser("devices", help="device profiles; will an artifact fit and how fast will it decode")
    d.add_argument("action", choices=["list", "check"])
    d.add_argument("--device", help="profile name (see `edgeft devices list`)")
    d.add_argument("--run", help="run directory: checks its exports/model.pte (else its newest GGUF)")
    d.add_argument("--artifact", help="a .pte or .gguf file instead of --run")
    d.add_argument("--context", type=int, default=2048, help="KV-cache length to budget for (default 2048)")

    r = sub.add_parser("run", help="generate from a .pte (ExecuTorch's LLM runner) or .gguf (llama.cpp) on this host")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--pte", help="ExecuTorch program (tokenizer.json is looked up beside it)")
    src.add_argument("--gguf", help="GGUF file, run with llama.cpp (llama-cpp-python)")
    r.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    tmpl = r.add_mutually_exclusive_group()
    tmpl.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default when the artifact has one)")
    tmpl.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is")
    r.add_argument("--tokenizer", help="tokenizer.json (or its directory) for a .pte, if not beside it")
    r.add_argument("--threads", type=int, help="CPU threads (ExecuTorch threadpool / llama.cpp n_threads)")
    r.add_argument("--verbose", action="store_true", help="show the runtime's own log on stderr")

    c = sub.add_parser("convert", help="re-run QAT convert / PTQ for a run from its saved model")
    c.add_argument("--run")

    q = sub.add_parser("qat", help="QAT schemes and presets")
    q.add_argument("action", choices=["list"])

    sub.add_parser("models", help="list built-in models")
    sub.add_parser("templates", help="list the chat-template registry")
    return p


_TRAIN_KEYS = [
    "model", "data", "data_split", "out", "resume", "overwrite", "mode", "adapter", "load_in_4bit", "load_in_8bit",
    "qat", "qat_group_size", "qat_weight_scale", "qat_int8", "ptq", "qat_distill", "qat_distill_positions", "qat_distill_temperature", "qat_init", "qat_corpus", "qat_lr",
    "qat_scale_lr", "qat_max_steps", "chat_template", "system_prompt", "prompt_template", "output_column",
    "conversation_extension", "max_seq_length", "padding_free", "packing", "eval_split", "eval_steps",
    "early_stopping_patience", "early_stopping_threshold", "load_best", "max_steps", "epochs", "batch_size",
    "grad_accum", "optim", "lr", "embedding_lr", "weight_decay", "schedule", "warmup_ratio", "warmup_steps",
    "max_grad_norm", "dtype", "device", "kernels", "gradient_checkpointing", "distributed", "seed", "save_steps", "save_total_limit", "report_to",
    "logging_steps", "threads", "progress",
]
_LORA_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_bias": "bias",
              "lora_target_modules": "target_modules", "lora_modules_to_save": "modules_to_save",
              "use_rslora": "use_rslora"}


def _train_config(args: argparse.Namespace):
    """Flags over the --config file; with --resume and no --config, over the run's own config.yaml."""
    from .config import TrainConfig, load_yaml
    from .rundir import RunDir

    if args.config:
        cfg = load_yaml(args.config)
    elif args.resume and args.out and RunDir(args.out).is_run():
        cfg = load_yaml(RunDir(args.out).config_file)
    else:
        cfg = TrainConfig()
    over: dict[str, Any] = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k, None) is not None}
    cfg = dataclasses.replace(cfg, **over)
    lora = {v: getattr(args, k) for k, v in _LORA_KEYS.items() if getattr(args, k, None) is not None}
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
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 talks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="edgeft: %(message)s")
    try:
        return _dispatch(args)
    except EdgeftError as e:
        print(f"edgeft: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        why = _disk_full(e)
        if why is None:
            raise
        # atomic writes left nothing half-written: freeing space and running the command again is the whole fix
        print(f"edgeft: error: {why}; nothing was replaced: free some space and run the command again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeft: interrupted", file=sys.stderr)
        return 130


def _devices(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeft.devices import profiles

    if args.action == "list":
        rows = [{"name": p.name, "app memory": f"{p.app_memory_gib:g} GiB", "bandwidth": f"{p.bandwidth_gbs:g} GB/s",
                 "backends": ",".join(p.backends), "description": p.description} for p in profiles.PROFILES.values()]
        _print_table(rows, ["name", "app memory", "bandwidth", "backends", "description"])
        return 0
    if not args.device:
        raise EdgeftError("devices check needs --device (see `edgeft devices list`)")
    profile = profiles.get_profile(args.device)
    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from .rundir import RunDir

        exports = RunDir.find(args.run).exports
        artifact = exports.artifact()
        if artifact is None:
            raise EdgeftError(f"{exports.path} holds no .pte or .gguf; run `edgeft export pte` first")
    r = profiles.check(profile, artifact, context=args.context)
    print(r["verdict"])
    lo, hi = r["decode_tokens_per_s"]
    held = "held by the program" if r["kv_cache_source"] == "program" else "estimated"
    print(f"artifact {r['artifact_mb']:.1f} MB, KV cache {r['kv_cache_mb']:.1f} MB at {r['context']} tokens ({held}), "
          f"runtime memory ~{r['runtime_memory_mb']:.0f} MB; expected decode {lo:.0f}-{hi:.0f} tokens/s")
    for k in r["known"]:
        print(f"published on {profile.name}: {k['model']} {k['quant']} {k['tokens_per_s']:g} tokens/s ({k['source']})")
    return 0 if r["fits"] else 1


def _run(args: argparse.Namespace) -> int:
    """Stream the generated text to stdout; the numbers go to stderr, so `> out.txt` keeps only the text."""
    from edgeft.devices.host_run import run_artifact

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    r = run_artifact(args.pte or args.gguf, args.prompt, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, chat=args.chat, tokenizer=args.tokenizer, on_text=show,
                     verbose=args.verbose, threads=args.threads, runtime="pte" if args.pte else "gguf")
    sys.stdout.write("\n")
    sys.stdout.flush()

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    print(f"prompt {r['prompt_tokens']} tokens{' (chat template)' if r['chat'] else ''}, generated "
          f"{r['generated_tokens']} tokens ({'end of sequence' if r['stopped'] == 'eos' else 'length limit'}); "
          f"time to first token {num(r['ttft_s'] and r['ttft_s'] * 1000, '.0f')} ms; prefill "
          f"{num(r['prefill_tokens_per_s'], '.1f')} tokens/s; decode {num(r['decode_tokens_per_s'], '.1f')} tokens/s "
          f"({r['timing_source']}, {r['threads']} threads)"
          + ("; finished by a token loop on the same program: the runner's binding cannot pass a partial UTF-8 "
             "character" if r.get("engine", "").startswith("TextLLMRunner, then") else ""), file=sys.stderr)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from . import pipeline

    if args.command == "train":
        run = pipeline.train(_train_config(args))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"run: {run}")
    elif args.command == "export":
        kw: dict[str, Any] = {}
        if args.max_seq_len and args.format == "pte":
            kw["max_seq_len"] = args.max_seq_len
        if args.quant and args.format != "gguf":
            raise EdgeftError("--quant applies to gguf exports only")
        if args.logits:
            if args.format != "pte":
                raise EdgeftError("--logits applies to pte exports only")
            kw["logits"] = args.logits
        report = pipeline.export(args.format, args.run, quant=args.quant, **kw)
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2, default=str))
    elif args.command == "eval":
        from edgeft.devices.evaluate import load_eval_data, render_markdown

        from edgeft.devices import regression

        golden = regression.load_golden(args.check) if args.check else None  # a bad file fails before evaluating
        data = load_eval_data(args.data, args.limit)  # so does bad evaluation data
        report = pipeline.evaluate(
            args.run, runtimes=args.runtimes, variants=args.compare, limit=args.limit, ppl_tokens=args.ppl_tokens,
            data=data, require_exports=True,
        )
        print(render_markdown(report))
        print(f"report: {report['run']}/eval/report.md")
        if args.write_golden:
            from edgeft.fsutil import write_json

            write_json(args.write_golden, regression.golden_from_report(report))
            print(f"golden: {args.write_golden}")
        if golden is not None:
            problems = regression.check(report, golden)
            for line in problems:
                print(f"edgeft: drift: {line}", file=sys.stderr)
            if problems:
                return 1
            print(f"check: all {len(golden['metrics'])} golden metrics within tolerance")
    elif args.command == "devices":
        return _devices(args)
    elif args.command == "run":
        return _run(args)
    elif args.command == "convert":
        print(f"converted: {pipeline.convert(args.run)}")
    elif args.command == "qat":
        from edgeft.qat import describe

        _print_table(describe(), ["name", "kind", "exporters", "description"])
    elif args.command == "templates":
        from .data import describe_templates

        _print_table(describe_templates(), ["name", "stop", "description"])
    elif args.command == "models":
        from .models import list_models

        _print_table([{"name": k, "description": v} for k, v in list_models().items()], ["name", "description"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
