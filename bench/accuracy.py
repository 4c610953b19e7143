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
timings) and prints a table. From the evaluator's per-question results (eval/questions.jsonl) it also gives 95%
intervals for the recovery (``intervals``): treating the three accuracies as independent binomials, and paired,
resampling the questions (the same resampled set for BF16, PTQ and QAT), with the discordant questions.

    python bench/accuracy.py                          # ~30 min on 2 CPU cores (train ~10, eval+exports ~15)
    python bench/accuracy.py --recipe labels --tag labels   # QAT on labels from the pretrained model (old recipe)
    python bench/accuracy.py --run runs/acc --no-train      # evaluate an existing run again
    python bench/accuracy.py --run runs/acc --no-eval       # train only (then --no-train evaluates)
    python bench/accuracy.py --twin runs/acc --run runs/acc-t --recipe targets --tag targets --runtimes eager \
        --limit 200 --no-agreement    # another QAT recipe on runs/acc's twin: trains only the QAT run
    python bench/accuracy.py --twin runs/acc --run runs/acc-s --qat-max-steps 180 ...   # QAT 3x the twin's steps
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import header, result_path  # noqa: E402

from edgeft.rundir import RunDir, read_scheme  # noqa: E402

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
    "mse": {"qat_weight_scale": "mse"},  # int4 group scales searched for least squared error, not max|w|
    # and the MLP's input projections kept at int8 per channel (the kinds that lose the most, sensitivity.py)
    "mse-int8-gate-up": {"qat_weight_scale": "mse", "qat_int8": ["gate_proj", "up_proj"]},
    "int8-gate-up": {"qat_int8": ["gate_proj", "up_proj"]},  # the same on torchao's grid
    # int4 group scales trained with the weights (from torchao's max|w| scales: PTQ is the default's)
    "learned": {"qat_weight_scale": "learned"},
    "learned-lr2": {"qat_weight_scale": "learned", "qat_scale_lr": 2e-2},
    "learned-lr1": {"qat_weight_scale": "learned", "qat_scale_lr": 1e-2},
    "learned-lr025": {"qat_weight_scale": "learned", "qat_scale_lr": 2.5e-3},
    # learned scales distilling on the twin's own samples instead of (or beside) the packaged prose (issue 15)
    "learned-gen": {"qat_weight_scale": "learned", "qat_corpus_source": "generations"},
    "learned-mixed": {"qat_weight_scale": "learned", "qat_corpus_source": "mixed"},
    # device-fit plans (--qat auto, docs/device-fit.md), compared with the uniform run by bench/device_fit.py: a .pte
    # cap just under uniform phone-deployment's 99.6 MB, and android-4gb at 4k context with a 13.2 tokens/s floor (the
    # floor binds at a 99.7 MB .pte, where uniform just fits)
    "fit-pte-99": {"qat": "auto", "fit_max_size_mb": 99.5, "fit_artifact": "pte"},
    "fit-android-4gb-4k": {"qat": "auto", "fit_device": "android-4gb", "fit_context": 4096, "fit_min_decode": 13.2},
}
# what a QAT recipe may change: a twin trained under any of them is the same model (--twin)
RECIPE_KEYS = (
    "qat_distill",
    "qat_distill_positions",
    "qat_distill_temperature",
    "qat_init",
    "qat_corpus",
    "qat_lr",
    "qat_max_steps",
    "qat_weight_scale",
    "qat_int8",
    "qat_scale_lr",
    "qat_steps_ratio",
    "qat_min_steps",
    "qat_corpus_source",
    "qat_gen_tokens",
    "qat_gen_temperature",
    "qat",
    "fit_device",
    "fit_max_size_mb",
    "fit_min_decode",
    "fit_context",
    "fit_artifact",
)


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
    rows = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {
        "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "rel_err": float((got - ref).norm() / ref.norm()),
        "rel_err_max_row": float(rows.max()),
        "positions": int(ref.shape[0]),
    }


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
        row = {
            "variant": v,
            "runtime": r["runtime"],
            "artifact": r["artifact"],
            **_compare(got, refs[v]),
            "seconds": time.perf_counter() - t0,
        }
        scheme = read_scheme(sources[v])
        if r["runtime"] == "pte" and scheme is not None and (scheme.get("plan") or {}).get("scheme") == "int8-int4":
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


# --- intervals -----------------------------------------------------------------------------------------------


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    return min(
        1.0,
        sum(
            math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
            for i in range(0, k + 1)
        ),
    )


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion k/n, by bisection on the binomial CDF."""
    a = (1 - level) / 2

    def solve(f, value: float) -> float:  # f decreasing in p: the p where it falls to value
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) > value else (lo, mid)
        return (lo + hi) / 2

    # lower: P(X >= k) = a, i.e. P(X <= k - 1) = 1 - a; upper: P(X <= k) = a
    lower = 0.0 if k == 0 else solve(lambda p: _binom_cdf(k - 1, n, p), 1 - a)
    upper = 1.0 if k == n else solve(lambda p: _binom_cdf(k, n, p), a)
    return lower, upper


def _recovery_samples(b, p, q):
    """(QAT - PTQ) / (BF16 - PTQ) per bootstrap sample (arrays of accuracies); NaN where BF16 <= PTQ."""
    import numpy as np

    gap = b - p
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (q - p) / np.where(gap > 0, gap, 1), np.nan)


def _percentiles(x, level: float) -> tuple[list[float] | None, float]:
    """The percentile interval of the defined samples, and the share of samples where recovery is undefined."""
    import numpy as np

    ok = x[~np.isnan(x)]
    undefined = 1 - ok.size / x.size
    if not ok.size:
        return None, undefined
    a = 100 * (1 - level) / 2
    return [float(np.percentile(ok, a)), float(np.percentile(ok, 100 - a))], undefined


def intervals(
    correct: dict[str, list[bool]],
    n_boot: int = 20000,
    seed: int = 0,
    level: float = 0.95,
    target: float = TARGETS["accuracy"],
) -> dict:
    """Uncertainty of the accuracy recovery (QAT - PTQ) / (BF16 - PTQ) from per-question results.

    ``correct``: per variant (bf16, ptq, qat), each question's correctness, in the same question order.
    - ``accuracy_ci``: Clopper-Pearson per variant;
    - ``recovery_ci_independent``: parametric bootstrap treating the three accuracies as independent binomials
      (what can be said without per-question results; too wide when the variants agree on most questions);
    - ``recovery_ci_paired``: nonparametric bootstrap resampling questions, the same resampled set for all three
      variants (percentile interval), so a question every variant gets right (or wrong) moves none of the gaps;
    - ``discordant``: per pair, the questions only one of the two answers right: the pairs' differences, and so the
      paired interval's width, come from these alone.
    """
    import numpy as np

    v = {k: np.asarray(correct[k], dtype=np.float64) for k in ("bf16", "ptq", "qat")}
    n = v["bf16"].size
    if not n or any(x.size != n for x in v.values()):
        raise ValueError("per-question results of bf16, ptq and qat must cover the same questions")
    k = {name: int(x.sum()) for name, x in v.items()}
    rng = np.random.default_rng(seed)
    acc = {name: x.mean() for name, x in v.items()}
    independent = _recovery_samples(*(rng.binomial(n, acc[name], n_boot) / n for name in ("bf16", "ptq", "qat")))
    idx = rng.integers(0, n, size=(n_boot, n))
    paired = _recovery_samples(*(v[name][idx].mean(1) for name in ("bf16", "ptq", "qat")))
    ci_ind, undef_ind = _percentiles(independent, level)
    ci_pair, undef_pair = _percentiles(paired, level)

    def disc(a: str, b: str) -> dict[str, int]:
        return {
            f"{a}_only": int(((v[a] == 1) & (v[b] == 0)).sum()),
            f"{b}_only": int(((v[a] == 0) & (v[b] == 1)).sum()),
        }

    gap = k["bf16"] - k["ptq"]
    return {
        "n": n,
        # each question's correctness per variant (question order as given), so that repeats of a recipe under
        # other seeds can be pooled from the results files alone (bench/seed_pool.py)
        "answers": {name: "".join("1" if c else "0" for c in x) for name, x in v.items()},
        "level": level,
        "bootstrap_samples": n_boot,
        "seed": seed,
        "correct": k,
        "accuracy_ci": {name: list(clopper_pearson(k[name], n, level)) for name in k},
        "recovery": (k["qat"] - k["ptq"]) / gap if gap > 0 else None,
        "recovery_ci_independent": ci_ind,
        "recovery_ci_paired": ci_pair,
        "recovery_undefined_share": {"independent": undef_ind, "paired": undef_pair},
        # share of paired resamples at or above the target (a bootstrap proportion, not a test)
        "paired_share_at_or_above_target": float(np.mean(np.nan_to_num(paired, nan=-np.inf) >= target)),
        "discordant": {
            "qat_vs_ptq": disc("qat", "ptq"),
            "bf16_vs_ptq": disc("bf16", "ptq"),
            "qat_vs_bf16": disc("qat", "bf16"),
        },
    }


def question_intervals(questions: list[dict], runtimes: list[str], **kw) -> dict:
    """:func:`intervals` per runtime for exact match (``accuracy``) and multiple choice (``mc_accuracy``), the
    variants' rows matched by question id."""
    out: dict = {}
    for rt in runtimes:
        for kind, metric in (("exact", "accuracy"), ("mc", "mc_accuracy")):
            by = {
                var: {
                    q["id"]: q["correct"]
                    for q in questions
                    if q["runtime"] == rt and q["kind"] == kind and q["variant"] == var
                }
                for var in ("bf16", "ptq", "qat")
            }
            ids = sorted(by["bf16"])
            if not ids or any(sorted(by[var]) != ids for var in by):
                continue
            out.setdefault(rt, {})[metric] = intervals({var: [by[var][i] for i in ids] for var in by}, **kw)
    return out


# --- reusing a twin ----------------------------------------------------------------------------------------------


def reuse_twin(cfg, twin: Path, run: Path) -> None:
    """Set ``run`` up so that ``edgeft.train(cfg, resume=True)`` trains only the QAT run: ``twin``'s trained
    baseline/ (the no-QAT twin, which no QAT recipe setting touches) copied in, and ``cfg``'s resolved config
    written as the run's. Refuses a twin trained under any other setting than the recipe's."""
    import shutil

    from edgeft.config import config_diff, dump_yaml, load_yaml, resolve

    if not RunDir(twin).baseline.has_converted():
        raise SystemExit(f"--twin {twin}: no trained baseline/ there")
    mine = resolve(cfg)
    theirs = resolve(load_yaml(RunDir(twin).config_file)).replace(**{k: mine.get(k) for k in RECIPE_KEYS})
    diff = config_diff(theirs, mine)
    if diff:
        raise SystemExit(f"--twin {twin} was trained with other settings: {'; '.join(diff[:4])}")
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    src, dst = RunDir(twin).baseline, RunDir(run).baseline
    shutil.copytree(src.root, dst.root, ignore=shutil.ignore_patterns(src.exports.path.name, src.checkpoints.name))
    mine = mine.replace(resume=False, overwrite=False)
    # the QAT steps as the pipeline resolves them (a preset's ratio or floor): the resumed run compares its identity
    mine.qat = mine.qat.resolve_steps(mine.optim.max_steps)
    RunDir(run).config_file.write_text(dump_yaml(mine))


def twin_ptq_differs(cfg, twin: Path, run: Path | None = None) -> bool:
    """Whether the recipe quantizes differently from the twin (``qat_weight_scale``, ``qat_int8``, a device-fit
    plan): then the twin's PTQ is not this run's, and the run's baseline/ is converted again
    (:func:`reconvert_baseline`) and evaluated."""
    from edgeft.config import load_yaml, resolve
    from edgeft.pipeline import run_qat_plan

    mine = run_qat_plan(RunDir(run), resolve(cfg)) if run is not None else resolve(cfg).qat.plan()
    theirs = run_qat_plan(RunDir(twin), resolve(load_yaml(RunDir(twin).config_file)))
    return (mine.ptq_weight_scale, mine.int8_modules, mine.group_size) != (
        theirs.ptq_weight_scale,
        theirs.int8_modules,
        theirs.group_size,
    )


def reconvert_baseline(cfg, run: Path) -> None:
    """PTQ with the recipe's plan: the twin's float weights (``run``/baseline/model) quantized again."""
    from edgeft.models import load_trained
    from edgeft.pipeline import convert_model, run_qat_plan

    plan = run_qat_plan(RunDir(run), cfg)  # a device-fit run's plan is its qat_plan.json
    model, tokenizer = load_trained(RunDir(run).baseline)
    convert_model(model, tokenizer, plan, RunDir(run).baseline.converted)


def saved_rows(
    run: Path, variants: tuple[str, ...], runtimes: list[str], limit: int, device: str = "cpu"
) -> tuple[list[dict], list[dict]] | None:
    """``variants``' rows of ``run``'s eval/report.json and their per-question results (eval/questions.jsonl) when
    they cover ``runtimes`` on ``limit`` questions with the eager runtime on ``device`` (the same files give the same
    numbers), else None: an evaluation from before per-question results is done again."""
    from edgeft.devices.evaluate import read_questions

    path = RunDir(run).eval_report
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    rows = [r for r in rep["results"] if r["variant"] in variants and r["runtime"] in runtimes]
    if rep.get("task_examples") != limit or len(rows) != len(variants) * len(runtimes):
        return None
    if "eager" in runtimes and rep.get("eager_device", "cpu") != device:  # another device rounds differently
        return None
    questions = [q for q in read_questions(run) or [] if q["variant"] in variants and q["runtime"] in runtimes]
    if len(questions) != sum(r["n_tasks"] + r.get("n_mc", 0) for r in rows):
        return None
    return rows, questions


# --- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/bench-accuracy", help="run directory (default runs/bench-accuracy)")
    ap.add_argument("--no-train", action="store_true", help="evaluate the existing --run")
    ap.add_argument(
        "--no-eval",
        action="store_true",
        help="train (and convert) only; a later --no-train evaluates (on a GPU machine: train on the GPU in one "
        "call, evaluate on its CPU in the next)",
    )
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="default", help="QAT recipe (see RECIPES)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--qat", default="phone-deployment")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument(
        "--qat-max-steps",
        type=int,
        default=None,
        help="optimizer steps of the QAT run over the recipe (default: --max-steps, as the twin)",
    )
    ap.add_argument("--runtimes", default="eager,pte,gguf")
    ap.add_argument("--limit", type=int, default=60, help="task test questions (default 60, as `edgeft eval`)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed of the twin and the QAT run (default: edgeft's); a repeat of a recipe "
        "under another seed needs its own twin (the seed also draws the train/eval split)",
    )
    ap.add_argument("--no-agreement", action="store_true", help="skip the artifact-vs-converted comparison")
    ap.add_argument(
        "--eval-device", default="cpu", help="torch device of the eager evaluation (default cpu; cuda on a GPU machine)"
    )
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument(
        "--twin",
        help="an existing run whose no-QAT twin (baseline/) to reuse: train only the QAT "
        "run (the twin does not depend on the recipe); its eval/report.json's BF16 and "
        "PTQ rows are reused when they cover the same runtimes and --limit",
    )
    ap.add_argument(
        "--reuse-eval",
        action="store_true",
        help="with --no-train --twin: reuse --run's own QAT eval/report.json rows instead of evaluating again",
    )
    args = ap.parse_args()
    if args.no_train and args.no_eval:
        ap.error("--no-train and --no-eval leave nothing to do")

    import torch

    import edgeft
    from edgeft.config import load_yaml
    from edgeft.devices.evaluate import heldout_text, text_chunks
    from edgeft.devices.recovery import describe
    from edgeft.models import float_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = edgeft.TrainConfig(
        **{
            "model": args.model,
            "data": "builtin:tasks",
            "qat": args.qat,
            "max_steps": args.max_steps,
            "out": str(run),
            "overwrite": True,
            "progress": False,
            **RECIPES[args.recipe],  # a device-fit recipe's qat (auto) replaces --qat
            **({"qat_max_steps": args.qat_max_steps} if args.qat_max_steps else {}),
            **({"seed": args.seed} if args.seed is not None else {}),
        }
    )
    timings = {}
    t0 = time.perf_counter()
    if not args.no_train:
        print(
            f"training {args.model} ({args.recipe} recipe, {args.max_steps} steps, QAT "
            f"{cfg.qat.max_steps or 'per the preset'}) into {run}",
            flush=True,
        )
        if args.twin:
            reuse_twin(cfg, Path(args.twin), run)
            cfg = cfg.replace(resume=True, overwrite=False)  # the twin is complete: QAT run only
        edgeft.train(cfg)
        timings["train_s"] = time.perf_counter() - t0
    if args.no_eval:
        print(f"trained {run} in {timings.get('train_s', 0):.0f} s; evaluate it with --no-train", flush=True)
        return 0
    t1 = time.perf_counter()
    runtimes = [x for x in args.runtimes.split(",") if x]
    reused = None
    if args.twin:  # the twin's BF16 and PTQ are the same files as this run's baseline/: evaluated once, on the twin
        from edgeft.devices.evaluate import read_questions
        from edgeft.devices.recovery import recovery_table

        own_ptq = twin_ptq_differs(cfg, Path(args.twin), run)  # PTQ is this run's baseline/converted, not the twin's
        from edgeft.pipeline import run_qat_plan

        ptq_plan = RunDir(run).baseline.scheme_record()["plan"]
        if own_ptq and edgeft.qat.QATPlan.from_dict(ptq_plan) != run_qat_plan(RunDir(run), cfg):
            reconvert_baseline(cfg, run)  # baseline/ is still the twin's copy: PTQ under the recipe's plan
        mine_variants = ("ptq", "qat") if own_ptq else ("qat",)
        mine = (
            saved_rows(run, mine_variants, runtimes, args.limit, args.eval_device)
            if (args.no_train and args.reuse_eval)
            else None
        )
        if mine:
            print(f"QAT results reused from {run}/eval/report.json", flush=True)
            report = {
                "results": mine[0],
                "task_examples": args.limit,
                "heldout_tokens": json.loads(RunDir(run).eval_report.read_text()).get("heldout_tokens"),
            }
            questions = mine[1]
        else:
            report = edgeft.evaluate(
                run,
                runtimes=runtimes,
                variants=list(mine_variants),
                limit=args.limit,
                progress=False,
                device=args.eval_device,
            )
            questions = read_questions(run) or []
        reused = saved_rows(
            Path(args.twin), ("bf16",) if own_ptq else ("bf16", "ptq"), runtimes, args.limit, args.eval_device
        )
        if reused:
            print(
                f"{'BF16' if own_ptq else 'BF16 and PTQ'} results reused from {args.twin}/eval/report.json", flush=True
            )
        else:
            print(f"evaluating BF16 and PTQ on {args.twin} (reused by later --twin runs)", flush=True)
            edgeft.evaluate(
                Path(args.twin),
                runtimes=runtimes,
                variants=["bf16", "ptq"],
                limit=args.limit,
                progress=False,
                device=args.eval_device,
            )
            reused = saved_rows(
                Path(args.twin), ("bf16",) if own_ptq else ("bf16", "ptq"), runtimes, args.limit, args.eval_device
            )
        report["results"] = reused[0] + report["results"]
        questions = reused[1] + questions
        report["recovery"] = recovery_table(report["results"], questions)  # what `edgeft eval` reports
        report["reused_baselines_from"] = args.twin
    else:
        from edgeft.devices.evaluate import read_questions

        report = edgeft.evaluate(run, runtimes=runtimes, limit=args.limit, progress=False, device=args.eval_device)
        questions = read_questions(run) or []
    timings["eval_s"] = time.perf_counter() - t1
    ci = question_intervals(questions, runtimes)
    resolved = load_yaml(RunDir(run).config_file)

    agree = []
    if not args.no_agreement and any(r != "eager" for r in runtimes):
        from transformers import AutoTokenizer

        t2 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(RunDir(run).converted))
        chunks = text_chunks(tok, heldout_text(), 2048, 256)
        base = RunDir(run).baseline
        sources = {"bf16": float_dir(base), "ptq": base.converted, "qat": RunDir(run).converted}
        agree = agreement(report, sources, chunks)
        timings["agreement_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0

    rec = report["recovery"]  # per runtime and metric: point, paired interval, resolved (edgeft.devices.recovery)
    verdict = {
        rt: {
            m: (m in rec[rt] and rec[rt][m]["point"] is not None and rec[rt][m]["point"] >= TARGETS[m])
            for m in ("perplexity", "accuracy")
        }
        for rt in rec
    }
    for a in agree:
        a["meets_target"] = a["top1"] >= TARGETS["top1"] and a["rel_err"] <= TARGETS["rel_err"]
    info = RunDir(run).info() if RunDir(run).has_trained_model() else {}
    base_info = RunDir(run).baseline.info() if RunDir(run).baseline.has_trained_model() else {}
    out = {
        **header("accuracy"),
        "recipe": args.recipe,
        "qat_max_steps": resolved.qat.max_steps or resolved.optim.max_steps,  # the twin's: config's max_steps
        "config": resolved.to_dict(),
        "train_seconds": {
            "qat": (info.get("train") or {}).get("seconds"),
            "baseline": (base_info.get("train") or {}).get("seconds") if base_info else None,
        },
        "timings": timings,
        "targets": TARGETS,
        "results": [{k: v for k, v in r.items() if k != "samples"} for r in report["results"]],
        "recovery": rec,
        # per runtime and metric: Clopper-Pearson per variant, recovery intervals (independent binomials; paired:
        # questions resampled, the same set for every variant) and the discordant questions (intervals())
        "intervals": ci,
        "meets_targets": verdict,
        "agreement": agree,
        "heldout_tokens": report.get("heldout_tokens"),
        "task_examples": report.get("task_examples"),
        "twin": args.twin,
        "baselines_from_twin": bool(args.twin),
    }
    dest = result_path("accuracy", args.tag)
    tmp = dest.with_suffix(".json.tmp")  # a killed run leaves no half-written results file
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(dest)

    print(
        f"\n{args.model} {args.qat}, recipe {args.recipe}, QAT {out['qat_max_steps']} steps (twin "
        f"{resolved.optim.max_steps}): {report.get('heldout_tokens')} held-out tokens, "
        f"{report.get('task_examples')} task questions"
    )
    print(f"{'variant':8} {'runtime':8} {'ppl':>9} {'acc':>7}")
    for r in report["results"]:
        print(f"{r['variant']:8} {r['runtime']:8} {r['perplexity']:9.3f} {100 * r['accuracy']:6.1f}%")
    for rt, v in rec.items():
        pp = describe(v["perplexity"], perplexity=True) if "perplexity" in v else "n/a"
        ac = describe(v["accuracy"]) if "accuracy" in v else "n/a"
        print(f"recovery {rt}: perplexity {pp} (target 70%), accuracy {ac} (target 90%)")
    for rt, by in ci.items():
        for metric, c in by.items():
            if c["recovery"] is None:
                continue
            ind, pair, d = c["recovery_ci_independent"], c["recovery_ci_paired"], c["discordant"]
            print(
                f"{rt} {metric}: recovery {100 * c['recovery']:.0f}%, 95% CI independent "
                f"{100 * ind[0]:.0f}-{100 * ind[1]:.0f}%, paired {100 * pair[0]:.0f}-{100 * pair[1]:.0f}%; "
                f"discordant QAT/PTQ {d['qat_vs_ptq']['qat_only']}+{d['qat_vs_ptq']['ptq_only']}, "
                f"BF16/PTQ {d['bf16_vs_ptq']['bf16_only']}+{d['bf16_vs_ptq']['ptq_only']}, "
                f"QAT/BF16 {d['qat_vs_bf16']['qat_only']}+{d['qat_vs_bf16']['bf16_only']}"
            )
    for a in agree:
        print(f"agreement {a['variant']}/{a['runtime']}: top-1 {a['top1']:.4f}, rel err {a['rel_err']:.4f}")
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
