"""What bf16 updates that learn cost on the GPU: full fine-tuning tokens/s and peak memory, side by side.

Configurations (each in its own process, same random-init model and token batches as ``train_throughput.py``):

- ``edgeft_master``: bf16 weights, edgeft's kernels, fp32 master weights + fp32 AdamW state, each bf16 weight its
  master rounded stochastically after every step (edgeft's default, ``edgeft.training.precision.MasterWeights``
  around fused AdamW);
- ``edgeft_master-nearest``: the same with the masters rounded to nearest (the default before; the difference to
  ``edgeft_master`` is what the stochastic rounding costs);
- ``edgeft_pure``: the same with the old pure-bf16 update (fused AdamW on the bf16 weights; loses updates);
- ``edgeft_stochastic``: bf16 weights and moments, torchao's AdamW with bf16 stochastic rounding (the alternative
  measured in docs/precision.md, not an edgeft option);
- ``liger_amp``: the peer as HF Trainer runs it with ``bf16=True``: fp32 weights, autocast to bf16, Liger-Kernel's
  fused kernels, fused AdamW on the fp32 weights; ``hf_amp``: the same without Liger;
- ``liger_bf16``: HF + Liger on bf16 weights with fused AdamW (pure bf16, what ``train_throughput.py`` measures).

Every configuration trains at the full fine-tuning default lr 2e-5 and reports, besides speed and peak memory, the
share of one projection matrix's weights its last step changed (a pure-bf16 update leaves most unchanged; stochastic
rounding redraws every weight whose master is between two bf16 numbers) and its losses against ``liger_amp``'s.
Writes JSON (date, device, versions) to ``bench/results/`` and prints a table.

    python bench/precision.py                                   # Qwen3-0.6B shape, batch 4 x 2048, on the GPU
    python bench/precision.py --device cpu --models smoke --seq 64 --impls edgeft_master,edgeft_master-nearest,hf_amp
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as tt  # noqa: E402 - the same models, weights, batches and process launcher
from _common import device, versions  # noqa: E402

ROOT = tt.ROOT
IMPLS = (
    "edgeft_master",
    "edgeft_master-nearest",
    "edgeft_pure",
    "edgeft_stochastic",
    "liger_amp",
    "hf_amp",
    "liger_bf16",
)
WATCH = "model.layers.0.mlp.down_proj.weight"  # the matrix whose changed share is reported


def torchao_sr_adamw(params, lr: float):
    """torchao's AdamW with bf16 stochastic rounding (``_AdamW`` since torchao 0.1x made it private)."""
    import torchao.optim as tao

    cls = getattr(tao, "AdamW", None) or tao._AdamW
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, bf16_stochastic_round=True)


def run_worker(spec: dict) -> dict:
    import torch
    import transformers

    impl, device = spec["impl"], spec.get("device", "cuda")
    cuda = device == "cuda"
    amp = impl.endswith("_amp")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cfg = tt._config(spec["model"])
    if impl.startswith("liger"):
        from liger_kernel.transformers import monkey_patch

        getattr(monkey_patch, f"apply_liger_kernel_to_{cfg.model_type}")()
    dtype = torch.float32 if amp else torch.bfloat16
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    tt._reinit(model, seed=0, device=device)
    model.train()
    ckpt = spec.get("checkpoint") or None
    if impl.startswith("edgeft"):
        from edgeft.arch import kernel_specs
        from edgeft.kernels import patch

        patch(model, kernel_specs(), checkpoint=ckpt)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lr = spec["lr"]
    if impl == "edgeft_stochastic":
        opt = torchao_sr_adamw([p for p in model.parameters() if p.requires_grad], lr)
    elif impl.startswith("edgeft"):
        from edgeft.training.optim import build_optimizer

        opt = build_optimizer(model, lr, 0.0, "adamw", bf16_update=impl.split("_", 1)[1])
    else:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True
        )
    gen = torch.Generator(device=device).manual_seed(1234)
    n = spec["warmup"] + spec["steps"]
    batches = [
        torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]), device=device, generator=gen) for _ in range(n)
    ]
    watch = dict(model.named_parameters())[WATCH]

    def one_step(ids):
        if impl.startswith("edgeft"):
            from edgeft.kernels import causal_lm_loss

            s, c = causal_lm_loss(model, ids, ids)
            loss = s / c
        else:
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i, ids in enumerate(batches):
        before = watch.detach().clone() if i == n - 1 else None
        sync()
        t0 = time.perf_counter()
        losses.append(one_step(ids).item())
        sync()
        times.append(time.perf_counter() - t0)
    changed = float((watch.detach() != before).float().mean())
    step_s = statistics.median(times[spec["warmup"] :])
    return dict(
        spec,
        step_ms=step_s * 1e3,
        tokens_per_s=spec["batch"] * spec["seq"] / step_s,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        losses=losses,
        final_loss=losses[-1],
        last_step_changed_share=changed,
        optimizer=repr(opt)[:80],
        params=sum(p.numel() for p in model.parameters()),
    )


def _table(results: list[dict], ref_impl: str = "liger_amp") -> str:
    rows = [
        "| model | impl | tokens/s | step ms | peak GiB | last step changed | final loss | max loss diff vs "
        f"{ref_impl} | speed vs {ref_impl} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["model"]: r for r in results if r["impl"] == ref_impl and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['impl']} | error: {r['error'][:120]} ||||||")
            continue
        b = ref.get(r["model"])
        diff = speed = "-"
        if b is not None and b is not r:
            diff = f"{max(abs(x - y) / abs(y) for x, y in zip(r['losses'], b['losses'])):.1e}"
            speed = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x"
        rows.append(
            f"| {r['model']} | {r['impl']} | {r['tokens_per_s'] / 1e3:.1f}k | {r['step_ms']:.0f} | "
            f"{r['peak_gib']:.2f} | {100 * r['last_step_changed_share']:.1f}% | {r['final_loss']:.4f} | "
            f"{diff} | {speed} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="qwen3-0.6b", help="comma list of " + ",".join(tt.MODELS))
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-5, help="default: edgeft's full fine-tuning lr")
    ap.add_argument(
        "--checkpoint",
        default="",
        help="gradient checkpointing: '' (none, default), plain, offload "
        "(edgeft's; HF and Liger: transformers' own for any value)",
    )
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for smoke-testing the script")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/precision-<date>.json)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    report: dict = {
        "bench": "precision",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "settings": {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "lr", "checkpoint")}
        | {"optimizer": "AdamW(fused) unless the impl says otherwise", "watched": WATCH},
    }
    results = []
    for model in args.models.split(","):
        for impl in args.impls.split(","):
            spec = dict(
                model=model,
                impl=impl,
                batch=args.batch,
                seq=args.seq,
                steps=args.steps,
                warmup=args.warmup,
                lr=args.lr,
                checkpoint=args.checkpoint,
                device=args.device,
            )
            res = tt._launch(spec, args.timeout, script=__file__)
            results.append(res)
            brief = {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in res.items()
                if k in ("model", "impl", "tokens_per_s", "peak_gib", "last_step_changed_share", "error")
            }
            print("run", json.dumps(brief), flush=True)
    report["results"] = results
    report["table"] = _table(results)
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("precision-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}\n")
    print(report["table"])


if __name__ == "__main__":
    main()
