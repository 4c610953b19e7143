"""Training throughput and peak memory: HF+PEFT, HF+PEFT+Liger-Kernel and edgeft, side by side on one GPU.

Every configuration runs in its own process (Liger patches transformers' classes globally, and peak-memory
counters must start clean) on the same random-init model (same seed, weights re-drawn by parameter name so every
implementation starts from identical tensors), the same token batches and the same optimizer (fused AdamW).
bf16 weights, LoRA r=16 on q/k/v/o/gate/up/down (or full fine-tuning), gradient checkpointing everywhere:
transformers' own (non-reentrant) for HF and Liger, edgeft's offloading one for edgeft.

edgeft is driven directly (``edgeft.kernels.patch`` + ``causal_lm_loss``), not through edgeft's training loop, so
the numbers isolate the kernels. Prints a table (tokens/s, step ms, peak GiB, final loss, max per-step loss
difference to HF+PEFT, speed ratio to the HF baseline) and writes JSON with date, device and versions.

    python bench/train_throughput.py                      # the issue's set (Qwen3-0.6B, Llama-3.2-1B, 8B shape)
    python bench/train_throughput.py --models qwen3-0.6b --modes lora --impls hf,edgeft --steps 5
    python bench/train_throughput.py --check              # GPU correctness of each kernel at these shapes first
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import device, versions  # noqa: E402

MODELS = {
    # shapes of the public checkpoints; weights are random
    "qwen3-0.6b": dict(
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        hidden_act="silu",
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        hidden_act="silu",
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        hidden_act="silu",
    ),
}
# a small shape for smoke-testing this script on a CPU (--device cpu --models smoke)
MODELS["smoke"] = dict(
    MODELS["qwen3-0.6b"],
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (model, mode, impl, batch). Checkpointing: edgeft offloads to host memory, edgeft_plain keeps checkpoints on the
# GPU, *_nockpt do not checkpoint at all (what `edgeft train` picks when the activations fit, see
# edgeft/training/model.py); HF and Liger use transformers' checkpointing unless suffixed _nockpt.
DEFAULT_RUNS = [
    *[
        (m, "lora", i, 4)
        for m in ("qwen3-0.6b", "llama-3.2-1b")
        for i in ("hf", "liger", "edgeft", "edgeft_plain", "edgeft_nockpt")
    ],
    *[("qwen3-0.6b", "full", i, 4) for i in ("hf", "hf_nockpt", "liger", "edgeft", "edgeft_nockpt")],
    *[("llama-3.1-8b", "lora", i, 2) for i in ("hf", "edgeft")],
]
# Published numbers for the fused-kernel library the issue names (not installable on the bench machine).
PUBLISHED_UNSLOTH = {"qwen3-0.6b": (36.0e3, 1.9), "llama-3.2-1b": (53.4e3, 3.7)}


# --- worker: one configuration in this process -----------------------------------------------------------------


def _config(name: str):
    from transformers import AutoConfig

    spec = dict(MODELS[name])
    model_type = spec.pop("model_type")
    rope_theta = spec.pop("rope_theta")
    scaling = spec.pop("rope_scaling", None)
    rope = dict(scaling or {"rope_type": "default"}, rope_theta=rope_theta)
    cfg = AutoConfig.for_model(model_type, **spec)
    cfg.rope_parameters = rope  # transformers 5 reads rope settings from here
    cfg.use_cache = False
    return cfg


def _reinit(model, seed: int, device: str) -> None:
    """Identical weights in every implementation: drawn in parameter-name order from one seeded generator."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.zero_()


def run_worker(spec: dict) -> dict:
    import torch
    import transformers

    model_name, mode, impl, batch, seq = spec["model"], spec["mode"], spec["impl"], spec["batch"], spec["seq"]
    device = spec.get("device", "cuda")
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cfg = _config(model_name)
    if impl == "liger":
        from liger_kernel.transformers import monkey_patch

        getattr(monkey_patch, f"apply_liger_kernel_to_{cfg.model_type}")()
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    _reinit(model, seed=0, device=device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
    model.train()
    patched: list[str] = []
    if impl.startswith("edgeft"):
        from edgeft.arch import kernel_specs
        from edgeft.kernels import patch

        ckpt = {"edgeft_plain": "plain", "edgeft_nockpt": None}.get(impl, spec.get("checkpoint", "offload"))
        patched = patch(model, kernel_specs(), checkpoint=ckpt)
    elif not impl.endswith("_nockpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4 if mode == "lora" else 1e-5, fused=True)
    gen = torch.Generator(device=device).manual_seed(1234)
    n_steps = spec["warmup"] + spec["steps"]
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=gen) for _ in range(n_steps)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = timed_steps(model, impl, opt, batches, sync)
    measured = times[spec["warmup"] :]
    step_s = statistics.median(measured)
    result = dict(
        spec,
        step_ms=step_s * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tokens_per_s=batch * seq / step_s,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        losses=losses,
        final_loss=losses[-1],
        trainable_params=sum(p.numel() for p in params),
        patched=len(patched),
    )
    if spec.get("profile"):
        result["profile"] = _profile(lambda: _one_step(model, impl, opt, batches[0]))
    return result


def _one_step(model, impl, opt, ids):
    """One optimizer step, the same for every implementation; returns the (mean) loss tensor."""
    if impl.startswith("edgeft"):
        from edgeft.kernels import causal_lm_loss

        s, n = causal_lm_loss(model, ids, ids)
        loss = s / n
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def timed_steps(model, impl, opt, batches, sync) -> tuple[list[float], list[float]]:
    """Run one step per batch; (losses, seconds per step), each step timed between device synchronisations."""
    losses, times = [], []
    for ids in batches:
        sync()
        t0 = time.perf_counter()
        losses.append(_one_step(model, impl, opt, ids).item())
        sync()
        times.append(time.perf_counter() - t0)
    return losses, times


def _profile(fn) -> str:
    """One step three ways: host issue time vs wall time, the top CUDA kernels, and where the host time goes."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0  # the host is done issuing; the GPU may still be working
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ka)
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    fn()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    return (
        f"host issue {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms, GPU busy {gpu_us / 1e3:.1f} ms\n"
        + ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60)
        + ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
        + "\n".join(buf.getvalue().splitlines()[:45])
    )


# --- GPU correctness of each kernel at bench shapes -----------------------------------------------------------


def run_check() -> list[dict]:
    """Each kernel vs its PyTorch reference on the GPU (bf16 at bench-like shapes), forward and backward."""
    import torch

    from edgeft.kernels.cross_entropy import lm_head_loss, lm_head_loss_reference
    from edgeft.kernels.geglu import geglu, geglu_reference
    from edgeft.kernels.rms_norm import rms_norm, rms_norm_reference
    from edgeft.kernels.rope import rope_, rope_reference
    from edgeft.kernels.swiglu import swiglu, swiglu_reference

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    out = []

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def compare(name, fn, ref, inputs, bound):
        xs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        x64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
        y, y64 = fn(*xs), ref(*x64)
        g = torch.randn_like(y64)
        y.backward(g.to(y.dtype))
        y64.backward(g)
        errs = [rel(y, y64)] + [rel(a.grad, b.grad) for a, b in zip(xs, x64) if a.requires_grad]
        out.append(dict(op=name, max_rel_err=max(errs), ok=max(errs) < bound))

    M = 4 * 2048
    x = torch.randn(M, 2048, device=dev, dtype=bf, requires_grad=True)
    w = torch.randn(2048, device=dev, dtype=bf, requires_grad=True)
    compare("rms_norm", lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: rms_norm_reference(a, b, 1e-5), [x, w], 1e-2)
    compare(
        "rms_norm_gemma",
        lambda a, b: rms_norm(a, b, 1e-6, 1.0),
        lambda a, b: rms_norm_reference(a, b, 1e-6, 1.0),
        [x, w],
        1e-2,
    )
    g = torch.randn(M, 3072, device=dev, dtype=bf, requires_grad=True)
    u = torch.randn(M, 3072, device=dev, dtype=bf, requires_grad=True)
    compare("swiglu", swiglu, swiglu_reference, [g, u], 1e-2)
    compare("geglu_tanh", lambda a, b: geglu(a, b, "tanh"), lambda a, b: geglu_reference(a, b, "tanh"), [g, u], 1e-2)
    compare("geglu", geglu, geglu_reference, [g, u], 1e-2)
    q = torch.randn(4, 2048, 16 * 128, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(4, 2048, 8 * 128, device=dev, dtype=bf, requires_grad=True)
    pos = torch.arange(2048, device=dev)[None].expand(4, -1)
    inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device=dev).float() / 128))
    emb = torch.cat([pos[..., None].float() * inv] * 2, -1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)

    def rope_fn(a, b):
        qa, kb = rope_(a * 1, b * 1, cos, sin, head_dim=128)
        return torch.cat([qa.reshape(-1), kb.reshape(-1)])

    def rope_ref(a, b):
        qa, kb = rope_reference(a.view(4, 2048, 16, 128), b.view(4, 2048, 8, 128), cos.double(), sin.double())
        return torch.cat([qa.reshape(-1), kb.reshape(-1)])

    compare("rope", rope_fn, rope_ref, [q, k], 1e-2)
    h = torch.randn(4096, 1024, device=dev, dtype=bf, requires_grad=True)
    W = (torch.randn(151936, 1024, device=dev) * 0.05).to(bf).requires_grad_()
    lab = torch.randint(0, 151936, (4096,), device=dev)
    lab[::5] = -100
    for cap in (None, 30.0):
        compare(
            f"lm_head_loss(softcap={cap})",
            lambda a, b: lm_head_loss(a, b, lab, cap)[0],
            lambda a, b: lm_head_loss_reference(a, b, lab, cap)[0],
            [h, W],
            1e-2,
        )
    return out


def run_attention_backends() -> list[dict]:
    """SDPA flash vs cuDNN vs FlexAttention (varlen path) timings for the bench shapes, fwd+bwd."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from edgeft.kernels.attention import packed_batch_from_position_ids, varlen_attention

    res = []
    for hq, hk, d in ((16, 8, 128), (32, 8, 64)):
        B, S = 4, 2048
        q = torch.randn(B, hq, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, hk, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, hk, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):

            def step():
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                o.backward(torch.ones_like(o))

            try:
                res.append(dict(shape=(hq, hk, d), backend=name, ms=do_bench(step, warmup=5, rep=30)))
            except Exception as e:  # backend not available for this shape
                res.append(dict(shape=(hq, hk, d), backend=name, error=str(e).splitlines()[0][:200]))
        if (hq, hk, d) != (32, 8, 64):
            continue
        # packed rows: 4 examples of 512 tokens per row, through the varlen path (flash-attn or FlexAttention)
        pos = torch.arange(S, device="cuda").remainder(512)[None].expand(B, -1)
        pb = packed_batch_from_position_ids(pos)
        qv = q.detach().transpose(1, 2).reshape(B * S, hq, d).requires_grad_()
        kv = k.detach().transpose(1, 2).reshape(B * S, hk, d).requires_grad_()
        vv = v.detach().transpose(1, 2).reshape(B * S, hk, d).requires_grad_()
        try:
            o = varlen_attention(qv, kv, vv, pb)
            ref = varlen_attention(qv, kv, vv, pb, backend="sdpa")
            go = torch.randn_like(o)
            dq = torch.autograd.grad(o, qv, go)[0]
            dq_ref = torch.autograd.grad(ref, qv, go)[0]
            err = max(
                ((o - ref).float().norm() / ref.float().norm()).item(),
                ((dq - dq_ref).float().norm() / dq_ref.float().norm()).item(),
            )

            def vstep():
                out = varlen_attention(qv, kv, vv, pb)
                out.backward(torch.ones_like(out))

            res.append(
                dict(
                    shape=(hq, hk, d),
                    backend="varlen(auto), 512-token docs",
                    ms=do_bench(vstep, warmup=5, rep=30),
                    rel_err_vs_masked_sdpa=err,
                )
            )
        except Exception as e:
            res.append(dict(shape=(hq, hk, d), backend="varlen(auto)", error=str(e).splitlines()[0][:200]))
    return res


# --- orchestration ---------------------------------------------------------------------------------------------


def _launch(spec: dict, timeout: int, script: str = __file__) -> dict:
    """Run ``script --worker SPEC`` in its own process (clean CUDA state and peak counters); its RESULT line."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timeout after {timeout}s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return dict(spec, error=" | ".join(tail)[-800:], wall_s=time.time() - t0)
    res = json.loads(lines[-1][len("RESULT ") :])
    res["wall_s"] = time.time() - t0
    return res


def _table(results: list[dict]) -> str:
    rows = [
        "| model | mode | impl | batch | tokens/s | step ms | peak GiB | final loss | max loss diff vs HF | vs HF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["mode"]): r for r in results if r["impl"] == "hf" and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['mode']} | {r['impl']} | {r['batch']} | error: {r['error'][:120]} |||||")
            continue
        b = base.get((r["model"], r["mode"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
        diff = "-"
        if b and r is not b:
            d = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], b["losses"]))
            r["max_rel_loss_diff_vs_hf"] = d
            diff = f"{d:.1e}"
        rows.append(
            f"| {r['model']} | {r['mode']} | {r['impl']} | {r['batch']} | {r['tokens_per_s'] / 1e3:.1f}k | "
            f"{r['step_ms']:.0f} | {r['peak_gib']:.2f} | {r['final_loss']:.4f} | {diff} | {ratio} |"
        )
    for m, (tps, gib) in PUBLISHED_UNSLOTH.items():
        rows.append(
            f"| {m} | lora | unsloth (published in the issue, not run here) | 4 | {tps / 1e3:.1f}k | - | "
            f"{gib:.1f} | - | - | - |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    ap.add_argument("--modes", default=None, help="lora,full")
    ap.add_argument("--impls", default=None, help="hf,liger,edgeft")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpoint", default="offload", help="edgeft checkpoint mode: offload|plain")
    ap.add_argument("--profile", default="", help="comma list model:mode:impl to profile one step of")
    ap.add_argument("--check", action="store_true", help="check every kernel against its reference on the GPU first")
    ap.add_argument("--attention", action="store_true", help="time the attention backends at the bench shapes")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for smoke-testing the script")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_throughput-<date>.json)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return

    all_runs = DEFAULT_RUNS + [("smoke", m, i, 2) for m in ("lora", "full") for i in ("hf", "edgeft")]
    runs = [
        r
        for r in (all_runs if args.models else DEFAULT_RUNS)
        if (not args.models or r[0] in args.models.split(","))
        and (not args.modes or r[1] in args.modes.split(","))
        and (not args.impls or r[2] in args.impls.split(","))
    ]
    profiles = set(filter(None, args.profile.split(",")))
    report: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
        "settings": {
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "dtype": "bfloat16",
            "lora": "r=16 alpha=32 dropout=0 on " + ",".join(TARGETS),
            "optimizer": "AdamW(fused=True)",
            "hf_checkpointing": "transformers, use_reentrant=False",
            "edgeft_checkpointing": args.checkpoint,
        },
    }
    if args.check:
        report["check"] = run_check()
        for c in report["check"]:
            print(f"check {c['op']:<28} max rel err {c['max_rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}", flush=True)
    if args.attention:
        report["attention_backends"] = run_attention_backends()
        for a in report["attention_backends"]:
            print("attention", a, flush=True)
    results = []
    for model, mode, impl, batch in runs:
        spec = dict(
            model=model,
            mode=mode,
            impl=impl,
            batch=batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            checkpoint=args.checkpoint,
            device=args.device,
            profile=f"{model}:{mode}:{impl}" in profiles,
        )
        res = _launch(spec, args.timeout)
        results.append(res)
        brief = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in res.items()
            if k in ("model", "mode", "impl", "tokens_per_s", "step_ms", "peak_gib", "final_loss", "error", "wall_s")
        }
        print("run", json.dumps(brief), flush=True)
    report["results"] = results
    table = _table(results)
    report["table"] = table
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("train_throughput-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    for r in results:
        if r.get("profile"):
            print(f"\n--- profile {r['model']} {r['mode']} {r['impl']} ---\n{r['profile']}")
    print(f"\nwrote {out}\n")
    print(table)


if __name__ == "__main__":
    main()
