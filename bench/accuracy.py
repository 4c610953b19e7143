"""Accuracy benchmark: BF16 vs PTQ vs QAT for SmolLM2-135M fine-tuned on ``builtin:tasks``, measured in eager
PyTorch, through the ExecuTorch ``.pte`` and through the GGUF on llama.cpp.

Drives the public API only: ``edgeft.train`` (QAT run + its no-QAT twin, edgeft's default recipe unless
``--recipe`` says otherwise), ``edgeft.evaluate`` (which exports every variant's ``.pte`` and GGUF), then, per
exported artifact, its agreement with the model it was converted from on the held-out text: pooled top-1 token
agreement and the relative logits error ||artifact − eager|| / ||eager|| over every held-out position. For each
int8-int4 ``.pte`` it also measures the two perturbations that explain the gap: the same converted model in eager
with its other attention kernel (sdpa vs eager: two correct implementations), and with its group scales rounded
to bf16 as XNNPACK stores them. With int8 dynamic per-token activations a perturbation of one rounding unit flips
activation roundings that compound layer by layer, so each of these moves the logits about as much as the .pte
does: the artifact is as close to the converted model as the converted model is to itself under re-association.

Targets (issue 6): QAT recovers >= 70% of PTQ's perplexity degradation and >= 90% of its task-accuracy loss,
recovery = (PTQ − QAT) / (PTQ − BF16); each artifact agrees with its converted model (top-1 >= 99%, relative
error <= 2e-2). Writes ``bench/results/accuracy-<date>-<device>[-tag].json`` (date, device, versions, config,
timings) and prints a table.

    python bench/accuracy.py                          # ~30 min on 2 CPU cores (train ~10, eval+exports ~15)
    python bench/accuracy.py --recipe labels --tag labels   # QAT on labels from the pretrained model (old recipe)
    python bench/accuracy.py --run runs/acc --no-train      # evaluate an existing run again
    python bench/accuracy.py --twin runs/acc --run runs/acc-t --recipe targets --tag targets --runtimes eager \
        --limit 200 --no-agreement    # another QAT recipe on runs/acc's twin: trains only the QAT run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"perplexity": 0.70, "accuracy": 0.90, "top1": 0.99, "rel_err": 2e-2}
RECIPES = {  # TrainConfig overrides
    "default": {},  # edgeft's defaults: QAT starts from the twin's weights and distils from it
    "labels": {"qat_distill": 0.0, "qat_init": "pretrained"},  # QAT on the labels from the pretrained model
    "init": {"qat_distill": 0.0, "qat_init": "baseline"},  # from the twin's weights, labels only
    "distill": {"qat_distill": 1.0, "qat_init": "pretrained"},  # distil from the twin, from the pretrained model
    "half": {"qat_distill": 0.5},  # the default with half the weight on the labels' cross-entropy
    "targets": {"qat_distill_positions": "targets"},  # distil the answers and the prose only, not the prompts
    "targets-prose10": {"qat_distill_positions": "targets", "qat_corpus": 0.1},  # more of the KL on the answers
    "targets-lr3": {"qat_distill_positions": "targets", "qat_lr": 3e-4},
    "lr3": {"qat_lr": 3e-4},
}
# what a QAT recipe may change: a twin trained under any of them is the same model (--twin)
RECIPE_KEYS = ("qat_distill", "qat_distill_positions", "qat_distill_temperature", "qat_init", "qat_corpus", "qat_lr")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchao", "transformers", "executorch", "llama_cpp_python", "gguf", "edgeft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["edgeft_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def _device() -> dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --- agreement of each artifact with its converted model -------------------------------------------------------


def _bf16_scale_view(model):
    """The converted model with every int weight's group scales rounded to bf16 (XNNPACK's blockwise storage),
    weights dequantized once, int8 dynamic activations kept (``dequantized_view``'s path)."""
    import torch
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from edgeft.devices.runtimes import dequantized_view

    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, IntxUnpackedToInt8Tensor) and isinstance(mod, torch.nn.Linear):
            w.scale = w.scale.to(torch.bfloat16).to(w.scale.dtype)
    return dequantized_view(model)[0]


def _logits(rt, chunks):
    import torch

    return torch.cat([rt.logits(ids)[:-1].float() for ids in chunks])


def _compare(got, ref) -> dict[str, float]:
    rows = ((got - ref).norm(dim=-1) / ref.norm(dim=-1))
    return {"top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "rel_err": float((got - ref).norm() / ref.norm()), "rel_err_max_row": float(rows.max()),
            "positions": int(ref.shape[0])}


def agreement(report: dict, sources: dict[str, Path], chunks: list[list[int]]) -> list[dict]:
    """Per exported artifact: top-1 agreement and relative logits error against its source model in eager."""
    from edgeft.devices.runtimes import load_runtime
    from edgeft.qat import load_converted

    out = []
    refs = {}
    for r in report["results"]:
        if r["runtime"] == "eager":
            continue
        v = r["variant"]
        if v not in refs:
            rt = load_runtime("eager", sources[v])
            refs[v] = _logits(rt, chunks)
            rt.close()
        rt = load_runtime(r["runtime"], r["artifact"])
        t0 = time.perf_counter()
        got = _logits(rt, chunks)
        rt.close()
        row = {"variant": v, "runtime": r["runtime"], "artifact": r["artifact"], **_compare(got, refs[v]),
               "seconds": time.perf_counter() - t0}
        scheme = sources[v] / "scheme.json"
        if r["runtime"] == "pte" and scheme.exists() and (json.loads(scheme.read_text()).get("plan") or {}).get(
                "scheme") == "int8-int4":
            from edgeft.devices.runtimes import EagerRuntime

            model, _, _ = load_converted(sources[v])
            impl = model.config._attn_implementation  # a second correct eager: the other attention kernel
            model.set_attn_implementation("eager" if impl != "eager" else "sdpa")
            row["eager_other_attention_vs_eager"] = _compare(_logits(EagerRuntime(model), chunks), refs[v])
            model.set_attn_implementation(impl)
            bf16 = _logits(EagerRuntime(_bf16_scale_view(model)), chunks)
            row["eager_bf16_scales_vs_eager"] = _compare(bf16, refs[v])
            row["pte_vs_eager_bf16_scales"] = _compare(got, bf16)
        out.append(row)
        print(f"  agreement {v}/{r['runtime']}: top-1 {row['top1']:.4f}, rel err {row['rel_err']:.4f}", flush=True)
    return out


# --- reusing a twin ----------------------------------------------------------------------------------------------


def reuse_twin(cfg, twin: Path, run: Path) -> None:
    """Set ``run`` up so that ``edgeft.train(cfg, resume=True)`` trains only the QAT run: ``twin``'s trained
    baseline/ (the no-QAT twin, which no QAT recipe setting touches) copied in, and ``cfg``'s resolved config
    written as the run's. Refuses a twin trained under any other setting than the recipe's."""
    import dataclasses
    import shutil

    from edgeft.config import config_diff, dump_yaml, resolve
    from edgeft.pipeline import run_config

    if not (twin / "baseline" / "converted" / "scheme.json").exists():
        raise SystemExit(f"--twin {twin}: no trained baseline/ there")
    mine = resolve(cfg)
    theirs = dataclasses.replace(resolve(run_config(twin)), **{k: getattr(mine, k) for k in RECIPE_KEYS})
    diff = config_diff(theirs, mine)
    if diff:
        raise SystemExit(f"--twin {twin} was trained with other settings: {'; '.join(diff[:4])}")
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    shutil.copytree(twin / "baseline", run / "baseline", ignore=shutil.ignore_patterns("exports", "checkpoints"))
    (run / "config.yaml").write_text(dump_yaml(dataclasses.replace(mine, resume=False, overwrite=False)))


def saved_rows(run: Path, variants: tuple[str, ...], runtimes: list[str], limit: int) -> list[dict] | None:
    """``variants``' rows of ``run``'s eval/report.json when it covers ``runtimes`` on ``limit`` questions (the
    same files give the same numbers), else None."""
    path = run / "eval" / "report.json"
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    rows = [r for r in rep["results"] if r["variant"] in variants and r["runtime"] in runtimes]
    if rep.get("task_examples") != limit or len(rows) != len(variants) * len(runtimes):
        return None
    return rows


# --- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/bench-accuracy", help="run directory (default runs/bench-accuracy)")
    ap.add_argument("--no-train", action="store_true", help="evaluate the existing --run")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="default", help="QAT recipe (see RECIPES)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--qat", default="phone-deployment")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--runtimes", default="eager,pte,gguf")
    ap.add_argument("--limit", type=int, default=60, help="task test questions (default 60, as `edgeft eval`)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-agreement", action="store_true", help="skip the artifact-vs-converted comparison")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--twin", help="an existing run whose no-QAT twin (baseline/) to reuse: train only the QAT "
                                   "run (the twin does not depend on the recipe); its eval/report.json's BF16 and "
                                   "PTQ rows are reused when they cover the same runtimes and --limit")
    ap.add_argument("--reuse-eval", action="store_true", help="with --no-train --twin: reuse --run's own QAT "
                                                               "eval/report.json rows instead of evaluating again")
    args = ap.parse_args()

    import torch

    import edgeft
    from edgeft.devices.evaluate import heldout_text, text_chunks
    from edgeft.pipeline import float_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = edgeft.TrainConfig(model=args.model, data="builtin:tasks", qat=args.qat, max_steps=args.max_steps,
                             out=str(run), overwrite=True, progress=False, **RECIPES[args.recipe])
    timings = {}
    t0 = time.perf_counter()
    if not args.no_train:
        print(f"training {args.model} ({args.recipe} recipe, {args.max_steps} steps) into {run}", flush=True)
        if args.twin:
            import dataclasses

            reuse_twin(cfg, Path(args.twin), run)
            cfg = dataclasses.replace(cfg, resume=True, overwrite=False)  # the twin is complete: QAT run only
        edgeft.train(cfg)
        timings["train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    runtimes = [x for x in args.runtimes.split(",") if x]
    reused = None
    if args.twin:  # the twin's BF16 and PTQ are the same files as this run's baseline/: evaluated once, on the twin
        from edgeft.devices.evaluate import recovery

        mine = saved_rows(run, ("qat",), runtimes, args.limit) if (args.no_train and args.reuse_eval) else None
        if mine:
            print(f"QAT results reused from {run}/eval/report.json", flush=True)
            report = {"results": mine, "task_examples": args.limit,
                      "heldout_tokens": json.loads((run / "eval" / "report.json").read_text()).get("heldout_tokens")}
        else:
            report = edgeft.evaluate(run, runtimes=runtimes, variants=["qat"], limit=args.limit, progress=False)
        reused = saved_rows(Path(args.twin), ("bf16", "ptq"), runtimes, args.limit)
        if reused:
            print(f"BF16 and PTQ results reused from {args.twin}/eval/report.json", flush=True)
        else:
            print(f"evaluating BF16 and PTQ on {args.twin} (reused by later --twin runs)", flush=True)
            reused = edgeft.evaluate(Path(args.twin), runtimes=runtimes, variants=["bf16", "ptq"], limit=args.limit,
                                     progress=False)["results"]
        report["results"] = reused + report["results"]
        by = {(r["variant"], r["runtime"]): r for r in report["results"]}
        report["recovery"] = {rt: {m: recovery(by["bf16", rt][m], by["ptq", rt][m], by["qat", rt][m], m != "perplexity")
                                   for m in ("perplexity", "accuracy", "mc_accuracy")} for rt in runtimes}
        report["reused_baselines_from"] = args.twin
    else:
        report = edgeft.evaluate(run, runtimes=runtimes, limit=args.limit, progress=False)
    timings["eval_s"] = time.perf_counter() - t1
    resolved = edgeft.pipeline.run_config(run)

    agree = []
    if not args.no_agreement and any(r != "eager" for r in runtimes):
        from transformers import AutoTokenizer

        t2 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(run / "converted"))
        chunks = text_chunks(tok, heldout_text(), 2048, 256)
        sources = {"bf16": float_dir(run / "baseline"), "ptq": run / "baseline" / "converted",
                   "qat": run / "converted"}
        agree = agreement(report, sources, chunks)
        timings["agreement_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    rec = report["recovery"]
    verdict = {rt: {m: (rec[rt].get(m) is not None and rec[rt][m] >= TARGETS[m]) for m in ("perplexity", "accuracy")}
               for rt in rec}
    for a in agree:
        a["meets_target"] = a["top1"] >= TARGETS["top1"] and a["rel_err"] <= TARGETS["rel_err"]
    info = json.loads((run / "model" / "edgeft.json").read_text()) if (run / "model" / "edgeft.json").exists() else {}
    out = {
        "bench": "accuracy",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device(),
        "versions": _versions(),
        "recipe": args.recipe,
        "config": resolved.to_dict(),
        "train_seconds": {"qat": (info.get("train") or {}).get("seconds"),
                          "baseline": (json.loads((run / "baseline/model/edgeft.json").read_text()).get("train") or
                                       {}).get("seconds") if (run / "baseline/model/edgeft.json").exists() else None},
        "timings": timings,
        "targets": TARGETS,
        "results": [{k: v for k, v in r.items() if k != "samples"} for r in report["results"]],
        "recovery": rec,
        "meets_targets": verdict,
        "agreement": agree,
        "heldout_tokens": report.get("heldout_tokens"),
        "task_examples": report.get("task_examples"),
        "twin": args.twin,
        "baselines_from_twin": bool(args.twin),
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dest = ROOT / "bench" / "results" / (f"accuracy-{dt.date.today():%Y%m%d}-{device}" +
                                         (f"-{args.tag}" if args.tag else "") + ".json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")

    print(f"\n{args.model} {args.qat}, recipe {args.recipe}: {report.get('heldout_tokens')} held-out tokens, "
          f"{report.get('task_examples')} task questions")
    print(f"{'variant':8} {'runtime':8} {'ppl':>9} {'acc':>7}")
    for r in report["results"]:
        print(f"{r['variant']:8} {r['runtime']:8} {r['perplexity']:9.3f} {100 * r['accuracy']:6.1f}%")
    for rt, v in rec.items():
        pp = "n/a" if v.get("perplexity") is None else f"{100 * v['perplexity']:.0f}%"
        ac = "n/a" if v.get("accuracy") is None else f"{100 * v['accuracy']:.0f}%"
        print(f"recovery {rt}: perplexity {pp} (target 70%), accuracy {ac} (target 90%)")
    for a in agree:
        print(f"agreement {a['variant']}/{a['runtime']}: top-1 {a['top1']:.4f}, rel err {a['rel_err']:.4f}")
    print(f"timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
