"""Distilled QAT training step: peak GPU memory and step time, fused heads + KL kernel vs materialised logits.

``edgeft train --qat phone-deployment`` distils the QAT student from its float twin (edgeft/training/distill.py). This
runs one such step the way the training loop does (``edgeft.training.backward_window`` with a ``Distillation``, then
a fused AdamW step): the student QAT-prepared (phone-deployment for full fine-tuning, int8-int4 for LoRA) with
edgeft's kernels patched, the teacher a float bf16 model of the same shape (random weights from a config, the
student's perturbed), and compares

- ``fused``: ``Distillation(fused=True)``, kernels/fused_linear_kl.py: both heads and the KL/CE a chunk of rows at a
  time, no (tokens x vocab) logits;
- ``materialised`` (the peer): ``Distillation(fused=False)``: both models' fp32 logits and log-softmaxes.

Each configuration runs in its own process (clean peak-memory counters) on identical weights and batches. Reports
median step ms, tokens/s, peak GiB and the per-step CE / KL (the two paths must agree to bf16 rounding), and writes
JSON with date, device and versions to bench/results/.

    python bench/distill_memory.py                                   # Qwen3-0.6B shape, full, 8 x 1024 tokens
    python bench/distill_memory.py --batch 4 --seq 2048 --modes full,lora --check
    python bench/distill_memory.py --model smoke --device cpu --steps 1 --warmup 0   # CPU dry run of the script
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device, versions  # noqa: E402
from train_throughput import MODELS, TARGETS, _config, _reinit  # noqa: E402
from train_throughput import _launch as _launch_script  # noqa: E402

SCHEME = {"lora": "int8-int4", "full": "phone-deployment"}
IMPLS = ("fused", "materialised")


# --- worker ------------------------------------------------------------------------------------------------------


def _models(spec: dict):
    """(QAT-prepared, kernel-patched student; float teacher) of the configured shape, identical in every process."""
    import torch
    import transformers

    from edgeft import qat
    from edgeft.arch import kernel_specs
    from edgeft.kernels import patch

    device, mode = spec["device"], spec["mode"]
    cfg = _config(spec["model"])
    with torch.device(device):
        student = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        teacher = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    _reinit(student, seed=0, device=device)
    _reinit(teacher, seed=0, device=device)
    gen = torch.Generator(device=device).manual_seed(5)
    with torch.no_grad():  # the twin differs from the student (else the KL and its gradient are ~0)
        for _, p in sorted(teacher.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * 0.004)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        student = get_peft_model(
            student, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
    student.train()
    ckpt = spec["checkpoint"]
    patch(student, kernel_specs(), checkpoint=None if ckpt == "off" else ckpt)
    cache = spec["cache"]
    if cache == "auto":  # what `edgeft train` picks (edgeft/training/model.py)
        from edgeft.config import TrainConfig
        from edgeft.training.model import qat_weight_cache

        run_cfg = TrainConfig(mode=mode, batch_size=spec["batch"], max_seq_length=spec["seq"], dtype="bf16")
        cache = qat_weight_cache(run_cfg, student, ckpt != "off", False, device)
    qat.prepare(student, SCHEME[mode], cache=cache)
    return student, teacher, cfg, cache


def run_worker(spec: dict) -> dict:
    import torch

    from edgeft.training import backward_window
    from edgeft.training.distill import Distillation

    device = spec["device"]
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    student, teacher, cfg, cache = _models(spec)
    d = Distillation(teacher, weight=spec["weight"], temperature=spec["temperature"], fused=spec["impl"] == "fused")
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4 if spec["mode"] == "lora" else 1e-5, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(1234)
    b, s = spec["batch"], spec["seq"]
    batches = []
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = torch.randint(0, cfg.vocab_size, (b, s), device=device, generator=gen)
        labels = ids.clone()
        labels[:, : s // 4] = -100  # a prompt quarter: distilled ("all" positions) but not a CE target
        batches.append({"input_ids": ids, "labels": labels})
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    times, ces, kls = [], [], []
    for batch in batches:
        sync()
        t0 = time.perf_counter()
        stats: dict = {}
        ce, _ = backward_window(student, [batch], device, distill=d, stats=stats)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        ces.append(ce)
        kls.append(stats["distill_kl"])
    step_s = statistics.median(times[spec["warmup"] :])
    return dict(
        spec,
        cache=cache,
        step_ms=step_s * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tokens_per_s=b * s / step_s,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        weights_and_state_gib_before_steps=base_gib,
        ce=ces,
        distill_kl=kls,
        trainable_params=sum(p.numel() for p in params),
    )


def run_check(device: str = "cuda") -> list[dict]:
    """The fused KL/CE loss and gradients vs the materialising reference (fp64) at the bench's head shape, bf16."""
    import torch

    from edgeft.kernels.fused_linear_kl import lm_head_kl_loss, lm_head_kl_loss_reference

    torch.manual_seed(0)
    n, d, v, bf = 4096, 1024, 151936, torch.bfloat16
    out = []

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for temp, cap, w in ((1.0, None, 1.0), (2.0, None, 0.5), (1.0, 30.0, 0.5)):
        h = torch.randn(n, d, device=device, dtype=bf, requires_grad=True)
        W = (torch.randn(v, d, device=device) * 0.05).to(bf).requires_grad_()
        ht = torch.randn(n, d, device=device, dtype=bf)
        Wt = (W.detach().float() + torch.randn(v, d, device=device) * 0.01).to(bf)
        lab = torch.randint(0, v, (n,), device=device)
        lab[::5] = -100
        mask = torch.rand(n, device=device) > 0.1
        kl, ce = lm_head_kl_loss(h, W, ht, Wt, lab, mask, temp, cap, cap, kl_weight=w, ce_weight=1 - w)
        (w * kl + (1 - w) * ce).backward()
        h64 = h.detach().double().requires_grad_()
        W64 = W.detach().double().requires_grad_()
        kl64, ce64 = lm_head_kl_loss_reference(h64, W64, ht.double(), Wt.double(), lab, mask, temp, cap, cap)
        (w * kl64 + (1 - w) * ce64).backward()
        errs = dict(
            kl=rel(kl, kl64), ce=rel(ce, ce64) if w < 1 else 0.0, dh=rel(h.grad, h64.grad), dw=rel(W.grad, W64.grad)
        )
        out.append(
            dict(
                op=f"lm_head_kl_loss(T={temp}, softcap={cap}, w={w})",
                **errs,
                max_rel_err=max(errs.values()),
                ok=max(errs.values()) < 2e-2,
            )
        )
        del h64, W64, kl64, ce64
    return out


# --- orchestration -----------------------------------------------------------------------------------------------


def _launch(spec: dict, timeout: int) -> dict:
    return _launch_script(spec, timeout, script=__file__)


def _table(results: list[dict]) -> str:
    rows = [
        "| mode | impl | tokens | tokens/s | step ms | peak GiB | CE step 1 | KL step 1 | vs materialised |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    peer = {r["mode"]: r for r in results if r["impl"] == "materialised" and "error" not in r}
    for r in results:
        tokens = f"{r['batch']} x {r['seq']}"
        if "error" in r:
            rows.append(f"| {r['mode']} | {r['impl']} | {tokens} | error: {r['error'][:150]} ||||||")
            continue
        vs = "-"
        p = peer.get(r["mode"])
        if p is not None and p is not r:
            r["speedup_vs_materialised"] = r["tokens_per_s"] / p["tokens_per_s"]
            r["peak_ratio_vs_materialised"] = r["peak_gib"] / p["peak_gib"] if p["peak_gib"] else float("nan")
            r["max_rel_diff_ce"] = max(abs(a / b - 1) for a, b in zip(r["ce"], p["ce"]))
            r["max_rel_diff_kl"] = max(abs(a / b - 1) for a, b in zip(r["distill_kl"], p["distill_kl"]) if b)
            peak = f"{r['peak_ratio_vs_materialised']:.2f}x" if p["peak_gib"] else "-"
            vs = (
                f"{r['speedup_vs_materialised']:.2f}x speed, {peak} peak; CE/KL "
                f"within {r['max_rel_diff_ce']:.1e}/{r['max_rel_diff_kl']:.1e}"
            )
        rows.append(
            f"| {r['mode']} | {r['impl']} | {tokens} | {r['tokens_per_s'] / 1e3:.1f}k | {r['step_ms']:.0f} | "
            f"{r['peak_gib']:.2f} | {r['ce'][0]:.4f} | {r['distill_kl'][0]:.4g} | {vs} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="qwen3-0.6b", help=",".join(MODELS))
    ap.add_argument("--modes", default="full", help="full (phone-deployment), lora (int8-int4), or both")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--weight", type=float, default=1.0, help="distillation weight w (1: pure KL, the default)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--checkpoint", default="off", help="student checkpointing: off|plain|offload")
    ap.add_argument("--weight-cache", default="auto", choices=["auto", "weights", "codes", "off"])
    ap.add_argument("--check", action="store_true", help="GPU correctness of the fused KL kernel first")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a dry run of the script")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/distill_memory-<date>.json)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("distill_memory-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    )
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": "bfloat16",
            "schemes": SCHEME,
            "weight": args.weight,
            "temperature": args.temperature,
            "positions": "all",
            "checkpoint": args.checkpoint,
            "weight_cache": args.weight_cache,
            "optimizer": "AdamW(fused=True)",
            "teacher": "float bf16, same shape, student's weights + N(0, 0.004)",
            "labels": "first quarter of each row -100 (distilled, not a CE target)",
        },
    }

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    if args.check:
        try:
            report["check"] = run_check(args.device)
        except Exception as e:  # keep the timings even if the check crashes
            report["check"] = [dict(op="crashed", ok=False, error=f"{type(e).__name__}: {e}"[:500])]
        for c in report["check"]:
            print("check", json.dumps(c), flush=True)
        save()
    results = []
    for mode in args.modes.split(","):
        for impl in args.impls.split(","):
            spec = dict(
                model=args.model,
                mode=mode,
                impl=impl,
                batch=args.batch,
                seq=args.seq,
                steps=args.steps,
                warmup=args.warmup,
                weight=args.weight,
                temperature=args.temperature,
                checkpoint=args.checkpoint,
                cache=args.weight_cache,
                device=args.device,
            )
            res = _launch(spec, args.timeout)
            results.append(res)
            brief = {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in res.items()
                if k in ("mode", "impl", "tokens_per_s", "step_ms", "peak_gib", "error", "wall_s")
            }
            print("run", json.dumps(brief), flush=True)
            report["results"] = results
            save()
    report["table"] = _table(results)
    save()
    print(f"\nwrote {out}\n")
    print(report["table"])


if __name__ == "__main__":
    main()
