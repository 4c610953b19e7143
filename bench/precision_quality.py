"""Does bf16 full fine-tuning learn what fp32 learns? SmolLM2-135M(-Instruct), ``builtin:tasks``, on the CPU.

Each variant is one ``edgeft.train`` run (full fine-tuning, edgeft's defaults: 60 steps, lr 2e-5, batch 8) that
differs only in the run's dtype and the seed; the edgeft commit decides the bf16 weight update (fp32 master
weights since issue 14, the pure-bf16 update before: run this script on both commits and ``--merge``). Per variant
it measures, on data never used for training nor to choose the recipe:

- ``eval_loss``: mean next-token loss per answer token on the ``builtin:tasks`` test split (the conversations
  masked as in training), computed in fp32 from the trained weights as saved;
- the evaluator's exact-match and multiple-choice accuracy on the first ``--limit`` test questions and the
  perplexity of the packaged held-out prose (``edgeft.evaluate``, eager runtime: the converted model in fp32);
- how far the weights moved: relative update norm ||W_T - W_0|| / ||W_0|| and the share of entries that changed.

Paired intervals: for every pair of variants, the difference of accuracy with a 95% bootstrap interval over the
same questions, and the discordant questions; the difference of eval loss with a bootstrap interval over test
conversations. The noise floor is fp32 against fp32 under another seed (another data order).

Also the "share of weights changed by one lr-sized step" of the pretrained projection weights in bf16
(``--one-step``), the number issue 14 quotes. Writes ``bench/results/precision_quality-<date>-cpu[-tag].json``.

    python bench/precision_quality.py --variants fp32,bf16 --limit 200      # ~1.5 h on 2 shared CPU cores
    python bench/precision_quality.py --variants fp32-s43 --limit 200 --tag noise
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import device, result_path, versions  # noqa: E402

from edgeft.rundir import RunDir  # noqa: E402

# TrainConfig overrides per variant; "-sN" suffix: seed N
VARIANTS = {
    "fp32": {"dtype": "fp32"},
    # edgeft's bf16 update: fp32 master weights since issue 14, the bf16 weights their stochastic rounding; on an
    # earlier commit, what that commit did (compare with --merge ... --rename bf16=bf16-nearest)
    "bf16": {"dtype": "bf16"},
    "bf16-nearest": {"dtype": "bf16"},  # fp32 masters rounded to nearest (Optimization.bf16_update="master-nearest")
    "bf16-pure": {"dtype": "bf16"},  # the pure-bf16 update, no masters (Optimization.bf16_update="pure")
}
UPDATES = {"bf16-nearest": "master-nearest", "bf16-pure": "pure"}  # Optimization.bf16_update per variant


def _base(name: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"(.+?)(?:-s(\d+))?", name)
    return m.group(1), m.group(2)


def variant_overrides(name: str) -> dict:
    base, seed = _base(name)
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, optionally with -sSEED")
    out = dict(VARIANTS[base])
    if seed:
        out["seed"] = int(seed)
    return out


def one_step_changes(model_dir: Path, lrs=(2e-5, 1e-4), seed: int = 0) -> dict[str, float]:
    """Share of the pretrained projection weights (every 2-D weight but embeddings) that change when one step of
    size lr (random sign, Adam's first steps are about +-lr) is added in bf16 with round-to-nearest."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for lr in lrs:
        changed = total = 0
        for name, p in model.named_parameters():
            if p.ndim != 2 or "embed" in name or "lm_head" in name:
                continue
            sign = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
            stepped = (p.float() + lr * sign).to(torch.bfloat16)
            changed += int((stepped != p).sum())
            total += p.numel()
        out[f"lr={lr:g}"] = changed / total
    return out


def weight_motion(initial_dir: Path, trained_dir: Path, start_dtype: str = "fp32") -> dict[str, float]:
    """||W_T - W_0|| / ||W_0|| over every weight, and the share of entries that differ. W_0: the pretrained
    weights as the run loaded them (rounded to bf16 for a bf16 run, whatever dtype it saved)."""

    from safetensors import safe_open

    files0 = {f.name: f for f in sorted(initial_dir.glob("*.safetensors"))}
    diff2 = ref2 = 0.0
    changed = total = 0
    for f in sorted(trained_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as t, safe_open(str(files0.get(f.name, next(iter(files0.values())))), "pt") as r:
            ref_keys = set(r.keys())
            for k in t.keys():  # noqa: SIM118 - safe_open is not a mapping
                if k not in ref_keys:
                    continue
                a, b = t.get_tensor(k), r.get_tensor(k)
                if start_dtype == "bf16":
                    b = b.bfloat16()
                changed += int((a != b.to(a.dtype)).sum())
                total += a.numel()
                diff2 += float((a.double() - b.to(a.dtype).double()).pow(2).sum())  # not bf16's rounding of W_0
                ref2 += float(b.double().pow(2).sum())
    return {"relative_update_norm": math.sqrt(diff2 / ref2), "share_changed": changed / max(total, 1)}


def eval_loss(run: Path, n: int) -> tuple[float, list[tuple[float, int]]]:
    """Mean loss per answer token over the first ``n`` test conversations (fp32), and per-conversation sums."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.data import Batcher, encode_dataset, load_records, tasks
    from edgeft.training.loop import lm_loss_sum

    model = AutoModelForCausalLM.from_pretrained(str(RunDir(run).model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(RunDir(run).model))
    records = load_records([{"messages": tasks.to_messages(r)} for r in tasks.generate("test")[:n]])
    examples = encode_dataset(tok, records, 512)
    batcher = Batcher(examples, "padding_free", tok.pad_token_id or 0, 512, 0)
    per = []
    with torch.no_grad():
        for i in range(len(batcher)):
            s, c = lm_loss_sum(model, batcher.collate([i]))
            per.append((float(s), int(c)))
    return sum(s for s, _ in per) / sum(c for _, c in per), per


def paired(a: list[bool] | list[tuple[float, int]], b, kind: str, n_boot: int = 20000, seed: int = 0) -> dict:
    """Difference a - b with a 95% bootstrap interval resampling the same items for both (accuracy, or loss per
    token as a ratio of sums)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(a)
    idx = rng.integers(0, n, size=(n_boot, n))
    if kind == "accuracy":
        x, y = np.asarray(a, float), np.asarray(b, float)
        diff = x[idx].mean(1) - y[idx].mean(1)
        point = x.mean() - y.mean()
        extra = {"a_only": int(((x == 1) & (y == 0)).sum()), "b_only": int(((x == 0) & (y == 1)).sum())}
    else:
        sa, ca = (np.asarray([v[i] for v in a], float) for i in (0, 1))
        sb, cb = (np.asarray([v[i] for v in b], float) for i in (0, 1))
        diff = sa[idx].sum(1) / ca[idx].sum(1) - sb[idx].sum(1) / cb[idx].sum(1)
        point = sa.sum() / ca.sum() - sb.sum() / cb.sum()
        extra = {}
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"diff": float(point), "ci95": [float(lo), float(hi)], **extra}


def tensor_core_linear() -> None:
    """Every ``F.linear`` of bf16 tensors computed as a GPU's tensor cores do: bf16 inputs, fp32 accumulation, the
    result rounded to bf16. This CPU's own bf16 GEMM (AVX2, no bf16 instructions) takes ~10 minutes per SmolLM2
    training step (measured: 580 s for step 1); fp32 GEMMs of the same bf16 values give the same products (bf16 x
    bf16 is exact in fp32) summed in fp32. Weights, activations, gradients and the optimizer stay bf16."""
    import torch
    import torch.nn.functional as F

    orig = F.linear

    def linear(x, w, b=None):
        if x.dtype != torch.bfloat16:
            return orig(x, w, b)
        return orig(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)

    F.linear = linear  # nn.Linear.forward looks F.linear up at every call


def run_variant(name: str, runs: Path, args, log) -> dict:
    import torch

    import edgeft
    from edgeft.devices.evaluate import read_questions

    over = variant_overrides(name)
    fields = set(edgeft.TrainConfig.keys())
    if not set(over) <= fields:
        raise SystemExit(f"variant {name}: this edgeft has no {sorted(set(over) - fields)} setting")
    run = runs / name
    cfg = edgeft.TrainConfig(
        model=args.model,
        data="builtin:tasks",
        mode="full",
        max_steps=args.max_steps,
        out=str(run),
        device="cpu",
        progress=False,
        threads=args.threads,
        **over,
    )
    res: dict = {"variant": name, "overrides": over, "run": str(run)}
    t0 = time.perf_counter()
    if not RunDir(run).has_converted():
        log(f"{name}: training {args.model} ({over})")
        import edgeft.training as etrain

        loop = etrain.train_loop
        update = UPDATES.get(_base(name)[0])
        if update:  # another bf16 update than the default, through the API
            etrain.train_loop = lambda model, data, opt, **k: loop(model, data, replace(opt, bf16_update=update), **k)
        try:
            edgeft.train(cfg.replace(overwrite=True))
        finally:
            etrain.train_loop = loop
    res["train_s"] = time.perf_counter() - t0
    info = RunDir(run).info()
    res["edgeft_json_train"] = {k: v for k, v in info["train"].items() if k in ("first_loss", "final_loss", "seconds")}
    res["precision"] = info.get("precision")
    res["train_losses"] = [json.loads(line)["loss"] for line in RunDir(run).metrics.read_text().splitlines()]
    from edgeft.models import resolve_model

    res["weights"] = weight_motion(resolve_model(args.model), RunDir(run).model, over.get("dtype", "fp32"))
    t1 = time.perf_counter()
    res["eval_loss"], per = eval_loss(run, args.limit)
    res["eval_loss_s"] = time.perf_counter() - t1
    log(f"{name}: eval loss {res['eval_loss']:.4f}; weights {res['weights']}")
    t2 = time.perf_counter()
    rep_path = RunDir(run).eval_report
    rep = json.loads(rep_path.read_text()) if rep_path.exists() else None
    if rep is None or rep.get("task_examples", 0) < args.limit:  # an evaluation of more questions is reused
        torch.set_num_threads(args.threads or torch.get_num_threads())
        rep = edgeft.evaluate(run, runtimes=["eager"], variants=["bf16"], limit=args.limit, progress=False)
    res["eval_s"] = time.perf_counter() - t2
    row = rep["results"][0]
    qs = [q for q in read_questions(run) or [] if q["index"] < args.limit]  # the first --limit questions
    res["questions"] = {
        kind: {q["id"]: bool(q["correct"]) for q in qs if q["kind"] == kind} for kind in ("exact", "mc")
    }
    acc = {k: sum(v.values()) / len(v) if v else None for k, v in res["questions"].items()}
    res.update(perplexity=row["perplexity"], accuracy=acc["exact"], mc_accuracy=acc["mc"])
    res["per_conversation_loss"] = per
    log(f"{name}: accuracy {res['accuracy']:.3f}, mc {res['mc_accuracy']}, ppl {row['perplexity']:.3f}")
    return res


def write(out: dict, results: dict, dest: Path) -> dict:
    """The results so far, with paired comparisons of every pair of variants, written atomically to ``dest``."""
    out["results"] = list(results.values())
    comps = {}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = results[a], results[b]
            c = {}
            for kind, metric in (("exact", "accuracy"), ("mc", "mc_accuracy")):
                ids = sorted(set(ra["questions"][kind]) & set(rb["questions"][kind]))
                if ids:
                    c[metric] = paired(
                        [ra["questions"][kind][q] for q in ids], [rb["questions"][kind][q] for q in ids], "accuracy"
                    )
            n = min(len(ra["per_conversation_loss"]), len(rb["per_conversation_loss"]))
            c["eval_loss"] = paired(ra["per_conversation_loss"][:n], rb["per_conversation_loss"][:n], "loss")
            comps[f"{a} - {b}"] = c
    out["paired"] = comps
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(dest)
    return comps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="fp32,bf16", help=f"comma list of {', '.join(VARIANTS)} (+ -sSEED)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=200, help="test questions (and test conversations for eval loss)")
    ap.add_argument("--runs", default="runs/precision", help="folder of the variants' run directories")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one-step", action="store_true", help="also the one-lr-step share of changed bf16 weights")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier results JSON files whose variants to compare too")
    ap.add_argument(
        "--rename",
        default="",
        help="OLD=NEW,...: rename merged variants (e.g. bf16=bf16-pure for a "
        "run of the commit before fp32 master weights)",
    )
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--cpu-bf16-gemm",
        choices=["tensor-core", "native"],
        default="tensor-core",
        help="bf16 F.linear as tensor cores compute it (fp32 GEMM of the bf16 values, bf16 result; "
        "default) or the CPU's native bf16 GEMM (~60x slower on AVX2)",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_bf16_gemm == "tensor-core":
        tensor_core_linear()
    runs = Path(args.runs)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    out: dict = {
        "bench": "precision_quality",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "settings": {
            "model": args.model,
            "max_steps": args.max_steps,
            "limit": args.limit,
            "mode": "full",
            "data": "builtin:tasks",
            "cpu_bf16_gemm": args.cpu_bf16_gemm,
        },
    }
    if args.one_step:
        from edgeft.models import resolve_model

        out["one_step_share_changed_bf16"] = one_step_changes(resolve_model(args.model))
        log(f"one lr-sized step in bf16 changes: {out['one_step_share_changed_bf16']}")
    results = {}
    renames = dict(kv.split("=", 1) for kv in args.rename.split(",") if kv)
    for path in args.merge:
        merged = json.loads(Path(path).read_text())
        for r in merged["results"]:
            name = renames.get(r["variant"], r["variant"])
            results[name] = dict(r, variant=name, from_file=Path(path).name, versions=merged["versions"])
    dest = result_path("precision_quality", args.tag, "cpu")
    for name in [v for v in args.variants.split(",") if v]:
        results[name] = run_variant(name, runs, args, log)
        comps = write(out, results, dest)  # after every variant: a later one may not finish
    comps = write(out, results, dest)

    print(f"\n{args.model}, full fine-tuning, {args.max_steps} steps; {args.limit} test questions")
    print(f"{'variant':18} {'eval loss':>9} {'exact':>7} {'mc':>7} {'ppl':>8} {'upd norm':>9} {'changed':>8}")
    for r in out["results"]:
        mc = "-" if r.get("mc_accuracy") is None else f"{100 * r['mc_accuracy']:.1f}%"
        print(
            f"{r['variant']:18} {r['eval_loss']:9.4f} {100 * r['accuracy']:6.1f}% {mc:>7} {r['perplexity']:8.3f} "
            f"{r['weights']['relative_update_norm']:9.2e} {100 * r['weights']['share_changed']:7.1f}%"
        )
    for k, c in comps.items():
        parts = [f"{m} {v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" for m, v in c.items()]
        print(f"{k}: " + "; ".join(parts))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
