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

from .config import Registry, TrainConfig, base_type
from .errors import EdgeftError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# how writers that wrap the OS error say it (safetensors: "os error 28", torch.save: "file write failed", numpy's
# tofile in gguf-py: "N requested and M written")
_DISK_FULL_TEXT = re.compile(
    r"No space left on device|File too large|Disk quota exceeded|os error (?:28|27|122)\b|"
    r"file write failed|\d+ requested and \d+ written"
)


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
    for name in (
        "torchao",
        "torch.utils._pytree",
        "torch._dynamo",
        "torch.export",
        "executorch",
        "httpx",
        "bitsandbytes",
        "gguf",
    ):
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


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type[TrainConfig] = TrainConfig) -> None:
    """One flag (or flag pair) per config field, grouped by section, derived from the fields' metadata
    (edgeft/config.py): ``--`` + the flat key, ``--no-x`` for a bool that defaults to True, csv for lists, the
    field's type and choices. Every value defaults to None ("not given"), its ``dest`` is ``section.field``."""
    for sec in config_cls.SECTIONS:
        group = parser.add_argument_group(sec.TITLE)
        types = sec.types()
        for f in sec.options():
            m, key, dest = f.metadata, sec.key(f), f"{sec.NAME}.{f.name}"
            base = base_type(types[f.name])
            flag = m.get("flag") or "--" + key.replace("_", "-").replace(".", "-")
            if m.get("flag") is False:  # only constant flags (e.g. --lora / --full), or none: YAML only
                if not m["consts"]:
                    continue
                exclusive = group.add_mutually_exclusive_group()
                for cflag, (const, chelp) in m["consts"].items():
                    exclusive.add_argument(cflag, dest=dest, action="store_const", const=const, help=chelp)
                continue
            if base is bool:
                if m.get("negatable"):
                    group.add_argument(flag, dest=dest, action="store_true", default=None, help=m["help"])
                    group.add_argument(
                        "--no-" + flag[2:], dest=dest, action="store_false", default=None, help=m["negatable"]
                    )
                elif f.default is True and not m.get("flag"):
                    group.add_argument(
                        "--no-" + flag[2:], dest=dest, action="store_false", default=None, help=m["help"]
                    )
                else:
                    group.add_argument(flag, dest=dest, action="store_true", default=None, help=m["help"])
                continue
            choices = m.get("choices") if m.get("cli_choices", True) else None
            # argparse names a value by its dest ("OPTIM.OPTIMIZER"): use the flag, or {a,b} for listed choices
            named = choices is None or isinstance(choices, Registry)
            metavar = m.get("metavar") or (flag[2:].replace("-", "_").upper() if named else None)
            kw: dict[str, Any] = {
                "dest": dest,
                "help": m["help"],
                "type": _csv if base is list else base,
                "metavar": metavar,
            }
            if choices is not None:
                kw["choices"] = choices
                if isinstance(choices, Registry):  # a registry is imported only when a value is checked or help shown
                    kw["help"] = (kw["help"] + "; " if kw["help"] else "") + "one of %(choices)s"
            group.add_argument(flag, **kw)
            for cflag, (const, chelp) in m.get("consts", {}).items():  # e.g. --fsdp beside --distributed
                group.add_argument(cflag, dest=dest, action="store_const", const=const, help=chelp)


def build_parser(config_cls: type[TrainConfig] = TrainConfig) -> argparse.ArgumentParser:
    """The ``edgeft`` parser; ``train``'s flags come from ``config_cls``'s fields (:func:`add_config_arguments`)."""
    p = _Parser(prog="edgeft", description="Fine-tune with QAT and take the model to a phone.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (LoRA or full), with QAT, then convert")
    t.add_argument("--config", help="YAML config file; flags override it")
    add_config_arguments(t, config_cls)

    e = sub.add_parser("export", help="export a run's converted model")
    e.add_argument("format", choices=["pte", "gguf", "torchao"])
    e.add_argument("--run", help="run directory (default: newest under ./runs)")
    e.add_argument(
        "--quant",
        help=f"GGUF type: {', '.join(GGUF_QUANTS)} (default: the scheme's bit width; the K-quants through llama.cpp)",
    )
    e.add_argument("--max-seq-len", type=int, help=".pte KV-cache length (default 512)")
    e.add_argument(
        "--logits",
        choices=["all", "last"],
        help=".pte output: logits for every position (all, default: model.pte, what `edgeft eval` runs) "
        "or the last one only (last: model-last.pte, for apps; less prefill work and memory)",
    )
    e.add_argument(
        "--embedding",
        choices=["int8", "int4"],
        help=".pte embedding: int8 per row (embedding_byte) or int4 in groups of 32 (embedding_4bit), "
        "quantized here when the run's embedding is not on that grid (default: as the run has it)",
    )
    e.add_argument(
        "--kv-cache",
        choices=["fp32", "int8"],
        help=".pte KV cache: fp32, or int8 per token and head (ExecuTorch's quantized KV cache; default: "
        "the run's device-fit plan's, else fp32)",
    )

    v = sub.add_parser(
        "eval",
        help="BF16 vs PTQ vs QAT on eager, .pte and GGUF runtimes",
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
    v.add_argument(
        "--data",
        action="append",
        metavar="FILE",
        help="your evaluation data (repeatable): a .txt file is held-out text for perplexity; a .jsonl "
        'file holds tasks, one JSON object a line: {"prompt" (or "question"), "answer"} is '
        'scored by exact match of the greedy answer, {"prompt", "choices": [...], "answer": '
        "index or choice text} by multiple choice; prompts get the run's chat template. What a file "
        "supplies replaces the built-in set of that kind, whole (--limit caps built-in questions only). Built-in "
        "sets: builtin:facts (a second task set, both kinds) and builtin:mixed-genre (held-out text "
        "of four genres, perplexity per genre, --ppl-tokens each)",
    )
    v.add_argument(
        "--check", metavar="GOLDEN.json", help="fail (exit 1, one line per metric) on drift from golden numbers"
    )
    v.add_argument("--write-golden", metavar="PATH", help="write this evaluation as a golden file")
    v.add_argument(
        "--device",
        default="cpu",
        help="torch device of the eager runtime (default cpu, the host as .pte and GGUF run; cuda has its own "
        "rounding, so compare variants within one device, and speeds up float models only: torchao's int8-int4 "
        "layout runs unfused reference ops there, slower than a few CPU threads)",
    )
    v.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (for logs and CI)")

    d = sub.add_parser("devices", help="device profiles; will an artifact fit and how fast will it decode")
    d.add_argument("action", choices=["list", "check"])
    d.add_argument("--device", help="profile name (see `edgeft devices list`)")
    d.add_argument("--run", help="run directory: checks its exports/model.pte (else its newest GGUF)")
    d.add_argument("--artifact", help="a .pte or .gguf file instead of --run")
    d.add_argument(
        "--context",
        type=int,
        help="KV-cache length to budget for (default: the run's device-fit plan's context, else 2048)",
    )

    r = sub.add_parser("run", help="generate from a .pte (ExecuTorch's LLM runner) or .gguf (llama.cpp) on this host")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--pte", help="ExecuTorch program (tokenizer.json is looked up beside it)")
    src.add_argument("--gguf", help="GGUF file, run with llama.cpp (llama-cpp-python)")
    r.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    tmpl = r.add_mutually_exclusive_group()
    tmpl.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="apply the chat template (default when the artifact has one)",
    )
    tmpl.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is")
    r.add_argument("--tokenizer", help="tokenizer.json (or its directory) for a .pte, if not beside it")
    r.add_argument("--threads", type=int, help="CPU threads (ExecuTorch threadpool / llama.cpp n_threads)")
    r.add_argument("--verbose", action="store_true", help="show the runtime's own log on stderr")

    c = sub.add_parser("convert", help="re-run QAT convert / PTQ for a run from its saved model")
    c.add_argument("--run")

    q = sub.add_parser("qat", help="QAT schemes and presets; a run's device-fit plan")
    q.add_argument("action", choices=["list"])
    q.add_argument("--run", help="print this run's device-fit plan (qat_plan.json: each tensor's format and why)")

    sub.add_parser("models", help="list built-in models")
    sub.add_parser("templates", help="list the chat-template registry")
    return p


def _train_config(args: argparse.Namespace, config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Flags over the --config file; with --resume and no --config, over the run's own config.yaml."""
    from .config import load_yaml
    from .rundir import RunDir

    out, resume = getattr(args, "run.out", None), getattr(args, "run.resume", None)
    if args.config:
        cfg = load_yaml(args.config, config_cls)
    elif resume and out and RunDir(out).is_run():
        cfg = load_yaml(RunDir(out).config_file, config_cls)
    else:
        cfg = config_cls()
    given: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            sec, name = dest.split(".", 1)
            given.setdefault(sec, {})[name] = value
    return cfg.replace(**{sec: dataclasses.replace(getattr(cfg, sec), **vals) for sec, vals in given.items()})


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
        print(f"edgeft: error: {why}; nothing was replaced: free some space and run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeft: interrupted", file=sys.stderr)
        return 130


def _devices(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgeft.devices import profiles

    if args.action == "list":
        rows = [
            {
                "name": p.name,
                "app memory": f"{p.app_memory_gib:g} GiB",
                "bandwidth": f"{p.bandwidth_gbs:g} GB/s",
                "backends": ",".join(p.backends),
                "description": p.description,
            }
            for p in profiles.PROFILES.values()
        ]
        _print_table(rows, ["name", "app memory", "bandwidth", "backends", "description"])
        return 0
    if not args.device:
        raise EdgeftError("devices check needs --device (see `edgeft devices list`)")
    profile = profiles.get_profile(args.device)
    plan = None
    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from edgeft.qat import plan as fit

        from .rundir import RunDir

        run = RunDir.find(args.run)
        plan = fit.load(run.root)
        exports = run.exports
        artifact = exports.artifact()
        if artifact is None:
            raise EdgeftError(f"{exports.path} holds no .pte or .gguf; run `edgeft export pte` first")
    context = args.context or (plan.budget.context if plan is not None else 2048)
    r = profiles.check(profile, artifact, context=context)
    if plan is not None:
        for line in plan.summary():
            print(line)
        b = plan.budget
        budgeted = Path(artifact).suffix.lstrip(".") in b.targets  # --fit-artifact: the other file was not
        if budgeted and b.max_size_mb is not None and r["artifact_mb"] > b.max_size_mb:
            r["fits"] = False
            r["verdict"] += f"; but {r['artifact_mb']:.1f} MB is over the plan's --max-size {b.max_size_mb:g} MB"
        lo = r["decode_tokens_per_s"][0]
        if budgeted and b.min_decode is not None and b.device == profile.name and lo < b.min_decode:
            r["fits"] = False
            r["verdict"] += f"; but {lo:.0f} tokens/s is under the plan's --min-decode {b.min_decode:g}"
    print(r["verdict"])
    lo, hi = r["decode_tokens_per_s"]
    held = "held by the program" if r["kv_cache_source"] == "program" else "estimated"
    print(
        f"artifact {r['artifact_mb']:.1f} MB, KV cache {r['kv_cache_mb']:.1f} MB at {r['context']} tokens ({held}), "
        f"runtime memory ~{r['runtime_memory_mb']:.0f} MB; expected decode {lo:.0f}-{hi:.0f} tokens/s"
    )
    for k in r["known"]:
        print(f"published on {profile.name}: {k['model']} {k['quant']} {k['tokens_per_s']:g} tokens/s ({k['source']})")
    return 0 if r["fits"] else 1


def _run(args: argparse.Namespace) -> int:
    """Stream the generated text to stdout; the numbers go to stderr, so `> out.txt` keeps only the text."""
    from edgeft.devices.host_run import run_artifact

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    r = run_artifact(
        args.pte or args.gguf,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        chat=args.chat,
        tokenizer=args.tokenizer,
        on_text=show,
        verbose=args.verbose,
        threads=args.threads,
        runtime="pte" if args.pte else "gguf",
    )
    sys.stdout.write("\n")
    sys.stdout.flush()

    def num(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    print(
        f"prompt {r['prompt_tokens']} tokens{' (chat template)' if r['chat'] else ''}, generated "
        f"{r['generated_tokens']} tokens ({'end of sequence' if r['stopped'] == 'eos' else 'length limit'}); "
        f"time to first token {num(r['ttft_s'] and r['ttft_s'] * 1000, '.0f')} ms; prefill "
        f"{num(r['prefill_tokens_per_s'], '.1f')} tokens/s; decode {num(r['decode_tokens_per_s'], '.1f')} tokens/s "
        f"({r['timing_source']}, {r['threads']} threads)"
        + (
            "; finished by a token loop on the same program: the runner's binding cannot pass a partial UTF-8 character"
            if r.get("engine", "").startswith("TextLLMRunner, then")
            else ""
        ),
        file=sys.stderr,
    )
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
        for flag, val in (("--embedding", args.embedding), ("--kv-cache", args.kv_cache)):
            if val and args.format != "pte":
                raise EdgeftError(f"{flag} applies to pte exports only")
        if args.embedding:
            kw["embedding"] = args.embedding
        if args.kv_cache:
            kw["kv_cache"] = args.kv_cache
        report = pipeline.export(args.format, args.run, quant=args.quant, **kw)
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2, default=str))
    elif args.command == "eval":
        from edgeft.devices import regression
        from edgeft.devices.evaluate import eval_device, load_eval_data, render_markdown

        eval_device(args.device)  # a missing GPU fails before anything loads
        golden = regression.load_golden(args.check) if args.check else None  # a bad file fails before evaluating
        data = load_eval_data(args.data, args.limit)  # so does bad evaluation data
        report = pipeline.evaluate(
            args.run,
            runtimes=args.runtimes,
            variants=args.compare,
            limit=args.limit,
            ppl_tokens=args.ppl_tokens,
            data=data,
            require_exports=True,
            progress=args.progress,
            device=args.device,
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

        if args.run:
            from edgeft.qat import plan as fit

            run = pipeline.find_run(args.run)
            fp = fit.load(run)
            if fp is None:
                raise EdgeftError(f"{run} has no device-fit plan ({fit.PLAN_FILE}): it was not trained with --qat auto")
            print("\n".join(fp.summary()))
        else:
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
