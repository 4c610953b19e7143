"""QAT overhead on the GPU: edgeft LoRA / full fine-tuning with and without QAT, next to torchao's own QAT on
HF (+PEFT), in one command.

Runs, each in its own process (clean peak-memory counters, no cross-talk), on a Qwen3-0.6B-shaped random-init model
(identical weights and batches everywhere, bf16, batch 4 x 2048, fused AdamW, gradient checkpointing):

- lora (r=16 on q/k/v/o/gate/up/down): HF+PEFT, HF+PEFT + torchao QAT int8-int4 (torchao's QATConfig on every
  linear but the adapters: base weights and adapters fake-quantized separately), edgeft, edgeft + QAT int8-int4
  (merged-weight fake quant; target >= 0.85x edgeft);
- full: HF, HF + torchao QAT phone-deployment (int8-int4 linears, int8 per-channel embeddings), edgeft, edgeft +
  QAT phone-deployment (target >= 0.8x edgeft);
- QAT may add at most 10% peak memory over the same implementation without it;
- ``edgeft_qat_mse`` (not in the default ``--impls``): edgeft + QAT with ``weight_scale="mse"`` (each 4-bit weight
  group picks its scale among ``MSE_RATIOS``), compared with edgeft and with ``edgeft_qat`` (absmax scales);
- ``edgeft_qat_learned`` (not in the default ``--impls``): ``weight_scale="learned"``, trained group scales (the
  fused linear Functions rebuild fq(W) in the backward and reduce the scales' gradient from their own dW, both
  with the kernels of ``kernels/learned_scale.py``).

edgeft is driven directly (``edgeft.kernels.patch`` + ``edgeft.qat.prepare`` + ``causal_lm_loss``) as in
train_throughput.py. ``--check`` first compares every fake-quant kernel (absmax and mse scales) with its PyTorch
reference on the GPU (bit for bit, bf16/fp16/fp32, bench shapes), the merged LoRA Function's gradients with an fp64
autograd reference, the fp8 schemes' convert with their fake quantization, and the learned scales' model-level bank
with ``learned_scale`` (``--check mse``: only the mse weight kernel, with kernel timings against absmax; ``--check
learned``: the learned-scale kernels, convert and bank). Prints a table and writes JSON with date, device and
versions; each row records its ``weight_scale``.

    python bench/qat_overhead.py --check          # everything (about 4 minutes on an H200)
    python bench/qat_overhead.py --modes lora --impls edgeft,edgeft_qat --steps 3
    python bench/qat_overhead.py --check mse --impls edgeft,edgeft_qat,edgeft_qat_mse --checkpoint off
    python bench/qat_overhead.py --check learned --impls edgeft,edgeft_qat,edgeft_qat_learned
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
from train_throughput import MODELS, TARGETS, _config, _one_step, _reinit, timed_steps  # noqa: E402
from train_throughput import _launch as _launch_script  # noqa: E402
from train_throughput import _profile as _profile_step  # noqa: E402

SCHEME = {"lora": "int8-int4", "full": "phone-deployment"}
# edgeft first: if the command runs out of time, the rows the targets are about come back
RUNS = [(m, i) for i in ("edgeft", "edgeft_qat", "edgeft_qat_mse", "edgeft_qat_learned") for m in ("lora", "full")] + [
    (m, i) for m in ("lora", "full") for i in ("hf", "hf_qat")
]
# the QAT implementations, their weight scale (qat.prepare's weight_scale; torchao's own QAT is absmax) and the
# implementation they are compared with
WEIGHT_SCALE = {"edgeft_qat": "absmax", "edgeft_qat_mse": "mse", "edgeft_qat_learned": "learned", "hf_qat": "absmax"}
BASE_IMPL = {"edgeft_qat": "edgeft", "edgeft_qat_mse": "edgeft", "edgeft_qat_learned": "edgeft", "hf_qat": "hf"}
TARGET_RATIO = {"lora": 0.85, "full": 0.80}
MEMORY_BUDGET = 1.10


# --- worker ------------------------------------------------------------------------------------------------------


def _torchao_qat(model, mode: str) -> int:
    """torchao's own QAT prepare on an HF (PEFT) model: QATConfig on every linear except LoRA's adapters."""
    from torch import nn
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from edgeft.qat import resolve

    plan = resolve(SCHEME[mode])
    n = [0]

    def lin(m, fqn):
        ok = type(m) is nn.Linear and "lora_" not in fqn
        n[0] += ok
        return ok

    quantize_(model, plan.qat_prepare_config(), filter_fn=lin)
    if plan.embedding_config() is not None:
        quantize_(
            model, QATConfig(plan.embedding_config(), step="prepare"), filter_fn=lambda m, fqn: type(m) is nn.Embedding
        )
    return n[0]


def run_worker(spec: dict) -> dict:
    import torch
    import transformers

    mode, impl, batch, seq = spec["mode"], spec["impl"], spec["batch"], spec["seq"]
    device = spec.get("device", "cuda")
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cfg = _config(spec["model"])
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    _reinit(model, seed=0, device=device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
        gen = torch.Generator(device=device).manual_seed(7)
        with torch.no_grad():  # non-zero B so that the merge (and QAT on it) matters from step one
            for n, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if "lora_B" in n:
                    p.normal_(0.0, 0.01, generator=gen)
    model.train()
    replaced: list[str] = []
    if impl.startswith("edgeft"):
        from edgeft.arch import kernel_specs
        from edgeft.kernels import patch

        ckpt = spec.get("checkpoint", "offload")
        patch(model, kernel_specs(), checkpoint=None if ckpt == "off" else ckpt)
        if impl.startswith("edgeft_qat"):
            from edgeft import qat

            cache = spec.get("cache", "auto")
            if cache == "auto":  # what `edgeft train` picks (edgeft/training/model.py)
                from edgeft.config import TrainConfig
                from edgeft.training.model import qat_weight_cache

                run_cfg = TrainConfig(mode=mode, batch_size=batch, max_seq_length=seq, dtype="bf16")
                cache = qat_weight_cache(run_cfg, model, ckpt != "off", False)
            replaced = qat.prepare(model, SCHEME[mode], cache=cache, weight_scale=WEIGHT_SCALE[impl])
            spec["cache"] = cache
    else:
        if impl == "hf_qat":
            replaced = ["x"] * _torchao_qat(model, mode)
        if spec.get("checkpoint", "offload") != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4 if mode == "lora" else 1e-5, fused=cuda)
    gen = torch.Generator(device=device).manual_seed(1234)
    n_steps = spec["warmup"] + spec["steps"]
    batches = [torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=gen) for _ in range(n_steps)]
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = timed_steps(model, impl, opt, batches, sync)
    step_s = statistics.median(times[spec["warmup"] :])
    res = dict(
        spec,
        step_ms=step_s * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tokens_per_s=batch * seq / step_s,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        losses=losses,
        final_loss=losses[-1],
        qat_modules=len(replaced),
    )
    if impl.startswith("edgeft_qat"):
        from edgeft.qat.prepare import fake_quant_cache_stats

        res["weight_cache"] = fake_quant_cache_stats(model)
        res["weight_quantizers"] = _weight_specs(model)
    if spec.get("profile") and cuda:
        try:
            res["profile"] = _profile(model, impl, opt, batches[0])
        except Exception as e:  # noqa: BLE001 - the timings matter more than the profile
            res["profile_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def _weight_specs(model) -> dict[str, int]:
    """How many weight fake quantizers the model holds, and how many of them search a clip ratio (mse scales)."""
    from edgeft.qat.fake_quant import WeightQuant

    total = search = 0
    for m in model.modules():
        for attr in ("spec", "weight_spec"):
            spec = getattr(m, attr, None)
            if isinstance(spec, WeightQuant):
                total += 1
                search += bool(spec.clip_ratios)
    return {"total": total, "clip_search": search}


def _profile(model, impl, opt, ids) -> str:
    """One step through train_throughput's profiler: host issue vs wall time, top CUDA kernels, host time by call."""
    return _profile_step(lambda: _one_step(model, impl, opt, ids))


# --- GPU correctness ---------------------------------------------------------------------------------------------


def run_check(subset: str = "all") -> list[dict]:
    """Kernels vs references on the GPU: bitwise for fake quant and the merge, fp64 autograd for the LoRA Function.

    ``subset="mse"``: only the mse-scale weight kernels (alone, on a merged LoRA weight, codes) and their timings."""
    from dataclasses import replace

    import torch

    from edgeft.kernels import fake_quant as K
    from edgeft.kernels.lora import Projection, lora_linear
    from edgeft.qat import fake_quant as R

    torch.manual_seed(0)
    dev = "cuda"
    out: list[dict] = []

    def record(name, mismatches, total, extra=None):
        out.append(dict(check=name, mismatches=int(mismatches), total=int(total), ok=mismatches == 0, **(extra or {})))

    def diff(a, b):
        return int((~((a == b) | (a.isnan() & b.isnan()))).sum())

    specs = {
        "int4-g32": R.WeightQuant("int", 4, 32),
        "int8-row": R.WeightQuant("int", 8, None),
        "int4-g32-fp16scale": R.WeightQuant("int", 4, 32, eps=258 * 2.0**-24, scale_dtype=torch.float16),
        "fp8-row": R.WeightQuant("fp8", 8, None),
        "fp8-int4-g128": R.WeightQuant("fp8_int4", 4, 128, divisor=8.0, eps=1e-6, lb=1e-12),
        # weight_scale="mse": the spec qat.prepare gives the bench's int4 linears (13 candidate clip ratios)
        "int4-g32-mse": _mse_spec(),
    }
    mse_only = subset == "mse"
    if mse_only:
        specs = {k: v for k, v in specs.items() if k.endswith("-mse")}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in ((3072, 1024), (1024, 3072)):
            w = torch.randn(shape, device=dev) * torch.logspace(-3, 0, shape[0], device=dev)[:, None] * 0.05
            w[1] = (torch.randint(-7, 7, (shape[1],), device=dev) + 0.5) * 2.0**-6  # x / scale exactly k + 0.5
            w[1, ::32] = 7.5 * 2.0**-6
            w[2, :128] = 0.0
            w = w.to(dtype)
            a = torch.randn(16, shape[1], device=dev) * 0.01
            b = torch.randn(shape[0], 16, device=dev) * 0.01
            merged = R.merge_lora_weight(w, a, b, 2.0)
            if not mse_only:
                record(f"merge {dtype} {shape}", diff(K.merged_lora_weight(w, a, b, 2.0), merged), w.numel())
            for name, spec in specs.items():
                ref = R.weight_ref(w, spec)
                extra = None
                if spec.clip_ratios:  # how often the search moved off max|w| (ratio 1): a check that it searched
                    gs = spec.group_size
                    _, _, s_ref = R.int_weight_ref(w, spec, return_codes=True)
                    _, _, s_abs = R.int_weight_ref(w, replace(spec, clip_ratios=()), return_codes=True)
                    extra = {"groups_off_absmax": int((s_ref != s_abs).sum()), "groups": w.numel() // gs}
                record(f"weight {name} {dtype} {shape}", diff(K.fake_quant_weight(w, spec), ref), w.numel(), extra)
                if name in ("int4-g32", "int4-g32-mse"):
                    record(
                        f"weight+lora {name} {dtype} {shape}",
                        diff(K.fake_quant_weight(w, spec, lora=(a, b, 2.0)), R.weight_ref(merged, spec)),
                        w.numel(),
                    )
                    o, c, s, p = K.fake_quant_weight(w, spec, codes=True)
                    record(
                        f"dequant(codes) {name} {dtype} {shape}",
                        diff(K.dequantize_codes(c, s, p, dtype, 32, shape[1]), o),
                        w.numel(),
                    )
                    if spec.clip_ratios:  # the scale each group picked is the reference's
                        s_ref = R.int_weight_ref(w, spec, return_codes=True)[2]
                        record(
                            f"scales {name} {dtype} {shape}",
                            diff(s.reshape(s_ref.shape).to(s_ref.dtype), s_ref),
                            s_ref.numel(),
                            {"dtype": str(s.dtype)},
                        )
        if mse_only:
            continue
        for k in (1024, 3072):
            x = (torch.randn(8192, k, device=dev) * 2 + 0.3).to(dtype)
            for kind in ("int8_asym", "fp8"):
                aspec = R.ActQuant(kind)
                record(
                    f"act {kind} {dtype} (8192, {k})", diff(K.fake_quant_act(x, aspec), R.act_ref(x, aspec)), x.numel()
                )
    if mse_only:
        return out + _launch_costs(mse_only=True)
    # merged LoRA + QAT Function (Q/K/V-like: three projections share x) against fp64 autograd with STE
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        M, H = 4096, 1024
        x = torch.randn(M, H, device=dev, dtype=dtype, requires_grad=True)
        aq, wq = R.ActQuant(), R.WeightQuant("int", 4, 32)
        ws = [(torch.randn(o, H, device=dev) * 0.03).to(dtype) for o in (2048, 1024, 1024)]
        As = [(torch.randn(16, H, device=dev) * 0.02).requires_grad_() for _ in ws]
        Bs = [(torch.randn(w.shape[0], 16, device=dev) * 0.02).requires_grad_() for w in ws]
        projs = [
            Projection(K.fake_quant_weight(w, wq, lora=(a, b, 2.0)), None, a, b, 2.0, merged=True, act_quant=aq)
            for w, a, b in zip(ws, As, Bs)
        ]
        ys = lora_linear(x, projs)
        gs = [torch.randn_like(y) for y in ys]
        torch.autograd.backward(ys, gs)
        x64 = x.detach().double().requires_grad_()
        xq = _replace(x64, R.act_ref(x.detach(), aq).double())
        refs, ref_params = [], []
        for w, a, b in zip(ws, As, Bs):
            a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            wm = w.double() + 2.0 * (b64 @ a64)
            wfq = _replace(wm, R.weight_ref(R.merge_lora_weight(w, a, b, 2.0), wq).double())
            refs.append(xq @ wfq.t())
            ref_params += [a64, b64]
        torch.autograd.backward(refs, [g.double() for g in gs])
        errs = [_rel(y, r) for y, r in zip(ys, refs)] + [_rel(x.grad, x64.grad)]
        errs += [_rel(p.grad, r.grad) for p, r in zip([t for ab in zip(As, Bs) for t in ab], ref_params)]
        out.append(
            dict(
                check=f"merged LoRA QAT Function fwd+bwd {dtype}",
                max_rel_err=max(errs),
                ok=max(errs) < bound,
                errs=dict(zip(["y_q", "y_k", "y_v", "dx", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"], errs)),
                tf32=bool(torch.backends.cuda.matmul.allow_tf32),
            )
        )
    # full fine-tuning: the per-step code cache gives the uncached fake quantization's bits, hit after hit
    w = torch.nn.Parameter((torch.randn(3072, 1024, device=dev) * 0.02).to(torch.bfloat16))
    cache, spec = K.WeightCache(), R.WeightQuant("int", 4, 32)
    fresh = K.fake_quant_weight(w, spec)
    n = sum(diff(K.weight_fake_quant(w, spec, cache), fresh) for _ in range(3))
    record("weight cache (3 uses) == uncached", n, 3 * w.numel(), {"hits": cache.hits, "misses": cache.misses})
    out += _fp8_convert_check()
    out += _learned_convert_check()
    out += _learned_kernel_check()
    out += _scale_bank_check()
    out += _launch_costs()
    return out


def _mse_spec():
    """The int4 weight spec ``qat.prepare(..., weight_scale="mse")`` gives the bench's linears (``plan_specs``:
    int8-int4's group-32 grid, torchao's scale dtype, the clip search over ``MSE_RATIOS``)."""
    from edgeft import qat
    from edgeft.qat.prepare import plan_specs

    return plan_specs(qat.resolve(SCHEME["lora"], weight_scale="mse"))[1]


def _launch_costs(mse_only: bool = False) -> list[dict]:
    """Host time per call (the Qwen3-0.6B steps are host-bound) and bandwidth at bench shapes."""
    import torch
    from triton.testing import do_bench

    from edgeft.kernels import fake_quant as K
    from edgeft.qat import fake_quant as R

    res = []
    if mse_only:  # the weight kernel with and without the clip search, at the bench's largest linear shape
        mse = _mse_spec()
        w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
        a, b = torch.randn(16, 1024, device="cuda") * 0.01, torch.randn(3072, 16, device="cuda") * 0.01
        for name, spec in (("absmax", R.WeightQuant("int", 4, 32)), ("mse", mse)):
            for label, fn in (
                ("weight int4", lambda s=spec: K.fake_quant_weight(w, s)),
                ("weight int4+lora r16", lambda s=spec: K.fake_quant_weight(w, s, lora=(a, b, 2.0))),
                ("torch reference weight int4", lambda s=spec: R.weight_ref(w, s)),
            ):
                ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
                res.append(
                    dict(
                        check=f"time {label} {name} (3072, 1024) bf16",
                        ms=ms,
                        gb_per_s=2 * w.numel() * 2 / ms / 1e6,
                        ok=True,
                    )
                )
        return res
    small_x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    small_w = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(16, 1024, device="cuda"), torch.randn(64, 16, device="cuda")
    spec, aspec = R.WeightQuant("int", 4, 32), R.ActQuant()
    for name, fn in (
        ("act int8 (8, 1024)", lambda: K.fake_quant_act(small_x, aspec)),
        ("weight int4+lora (64, 1024)", lambda: K.fake_quant_weight(small_w, spec, lora=(a, b, 2.0))),
    ):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        res.append(dict(check=f"host us/call {name}", us=(time.perf_counter() - t0) / 500 * 1e6, ok=True))
    x = torch.randn(8192, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16) * 0.02
    a, b = torch.randn(16, 1024, device="cuda") * 0.01, torch.randn(3072, 16, device="cuda") * 0.01
    for name, fn, nbytes in (
        ("act int8 (8192, 3072) bf16", lambda: K.fake_quant_act(x, aspec), 2 * x.numel() * 2),
        ("weight int4 (3072, 1024) bf16", lambda: K.fake_quant_weight(w, spec), 2 * w.numel() * 2),
        (
            "weight int4+lora r16 (3072, 1024) bf16",
            lambda: K.fake_quant_weight(w, spec, lora=(a, b, 2.0)),
            2 * w.numel() * 2,
        ),
        ("torch reference act int8 (8192, 3072)", lambda: R.act_ref(x, aspec), 2 * x.numel() * 2),
        ("torch reference weight int4 (3072, 1024)", lambda: R.weight_ref(w, spec), 2 * w.numel() * 2),
    ):
        ms = do_bench(fn, warmup=10, rep=50, return_mode="median")
        res.append(dict(check=f"time {name}", ms=ms, gb_per_s=nbytes / ms / 1e6, ok=True))
    return res


def _replace(x, value):
    """``value`` forward, gradient straight to ``x``."""
    import torch

    class Replace(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, v):
            return v

        @staticmethod
        def backward(ctx, g):
            return g, None

    return Replace.apply(x, value)


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fp8_convert_check() -> list[dict]:
    """fp8 schemes convert only on CUDA: converted vs fake-quant, per part, so a gap says where it comes from.

    torchao's fp8 PerRow weights need bf16, so the comparison is in bf16: the weight codes and scales must be
    bit-identical to the fake quantizer's, and one converted linear's output must equal the fake-quant matmul
    to bf16 rounding of the dequantized operands (a two-layer model also shows how a rounding flip propagates).
    """
    import copy

    import torch
    from torch import nn

    from edgeft import qat
    from edgeft.qat.fake_quant import FP8_MAX

    res = []
    for scheme in ("fp8-fp8", "fp8-int4"):
        for depth in (1, 2):
            name = f"convert == fake quant {scheme} bf16 {depth} layer(s)"
            torch.manual_seed(1)
            dims = [512, 384, 256][: depth + 1]
            model = nn.Sequential(*[nn.Linear(dims[i], dims[i + 1], bias=False) for i in range(depth)])
            model = model.cuda().to(torch.bfloat16)
            x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
            prepared = copy.deepcopy(model)
            try:
                qat.prepare(prepared, scheme)
                with torch.no_grad():
                    fq = prepared(x)
                plan = qat.resolve(scheme)
                qat.unprepare(prepared)
                qat.quantize(prepared, plan)
                with torch.no_grad():
                    real = prepared(x)
                row = dict(check=name, max_rel_err=_rel(real, fq))
                w = prepared[0].weight
                if scheme == "fp8-fp8" and hasattr(w, "qdata"):
                    ref = model[0].weight.detach()
                    scale = (ref.abs().amax(-1, keepdim=True) / FP8_MAX).float()
                    codes = (ref.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                    row["weight_codes_equal"] = bool(torch.equal(codes.view(torch.uint8), w.qdata.view(torch.uint8)))
                    row["weight_scales_equal"] = bool(torch.equal(scale.reshape(-1), w.scale.reshape(-1).float()))
                    row["fast_accum"] = bool(getattr(getattr(w, "mm_config", None), "use_fast_accum", None))
                # one layer: only operand rounding differs (~2^-9 per element); two: code flips can follow
                row["ok"] = row["max_rel_err"] <= (5e-3 if depth == 1 else 2e-2) and row.get("weight_codes_equal", True)
                res.append(row)
            except Exception as e:  # torchao's fp8-int4 needs mslk, which PyPI does not carry
                res.append(dict(check=name, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return res


def _learned_convert_check() -> list[dict]:
    """Learned scales on CUDA in bf16: convert writes the trained scales and the integers the fake quantizer used
    (each converted weight dequantizes to the fake-quantized weight bit for bit), int8-int4 and int4 grids."""
    import torch
    from torch import nn

    from edgeft import qat

    res = []
    for scheme in ("int8-int4", "int4"):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(1024, 768, bias=False), nn.Linear(768, 512, bias=False))
        model = model.cuda().to(torch.bfloat16)
        qat.prepare(model, scheme, weight_scale="learned")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("log_scale"):
                    p.normal_(0, 0.2)  # as if trained
            fq = [m.weight_fake_quantizer(m.weight).clone() for m in model]
        converted, record = qat.convert(model)
        equal = [bool(torch.equal(m.weight.dequantize(), w)) for m, w in zip(converted, fq)]
        res.append(
            dict(
                check=f"convert == fake quant, learned scales, {scheme} bf16",
                ok=all(equal),
                weights_equal=equal,
                learned_scales=record["learned_scales"],
            )
        )
    return res


def _learned_kernel_check() -> list[dict]:
    """The learned-scale kernels (kernels/learned_scale.py) on CUDA in bf16 at the bench model's shapes (LoRA r=16
    merged in, scales perturbed as if trained): fq(W) equal to the PyTorch reference bit for bit, the log-scale
    gradient to fp32 rounding, and each timed against the reference's chain of PyTorch ops (merge included)."""
    import torch
    from triton.testing import do_bench

    from edgeft.kernels import learned_scale as L
    from edgeft.qat import fake_quant as R

    res = []
    spec = R.WeightQuant("int", 4, 32)
    torch.manual_seed(3)

    def one(rows: int, cols: int, lora: bool) -> None:
        w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
        ad = (
            (torch.randn(16, cols, device="cuda") * 0.01, torch.randn(rows, 16, device="cuda") * 0.01, 2.0)
            if lora
            else None
        )
        init = R.initial_scale(w, spec)
        scale = R.learned_scale(init, torch.randn_like(init) * 0.2, spec, w.dtype)
        grad = torch.randn(rows, cols, device="cuda")

        def ref_fq():
            return R.learned_weight_ref(R.merge_lora_weight(w, *ad) if ad else w, scale, spec)

        def ref_grad():
            return R.learned_log_scale_grad(R.merge_lora_weight(w, *ad) if ad else w, scale, grad, spec)

        def ker_fq():
            return L.learned_fake_quant_weight(w, scale, spec, ad)

        def ker_grad():
            return L.learned_scale_grad(w, scale, grad, spec, ad)

        shape = f"({rows}, {cols}){' +lora r16' if lora else ''} bf16"
        res.append(dict(check=f"learned fq(W) kernel == reference {shape}", ok=bool(torch.equal(ker_fq(), ref_fq()))))
        err = _rel(ker_grad(), ref_grad())
        res.append(
            dict(check=f"learned log-scale gradient kernel vs reference {shape}", max_rel_err=err, ok=err < 1e-5)
        )
        for label, fn in (
            ("kernel fq(W)", ker_fq),
            ("reference fq(W)", ref_fq),
            ("kernel log-scale grad", ker_grad),
            ("reference log-scale grad", ref_grad),
        ):
            ms = do_bench(fn, warmup=5, rep=30, return_mode="median")
            res.append(dict(check=f"time learned {label} {shape}", ms=ms, ok=True))

    for shape in ((3072, 1024, True), (1024, 3072, True), (151936, 1024, False)):
        one(*shape)  # its tensors are freed on return
        torch.cuda.empty_cache()
    return res


def _scale_bank_check(device: str = "cuda") -> list[dict]:
    """The model-level bank of learned scales (``kernels.learned_scale.ScaleBank``: one foreach pass refreshes
    every quantizer's scales) on CUDA equals ``learned_scale`` (what convert writes) bit for bit: the bench model's
    197 scale shapes in bf16, plus fp32/fp16 weights and specs with their own eps and scale dtype in the same bank,
    log-scales that clamp at eps or overflow, before and after a fused AdamW step that moves a subset of them. And
    one refresh of the 197 timed against 197 calls of ``learned_scale`` (the launches a step used to pay)."""
    import torch

    from edgeft.kernels import learned_scale as L
    from edgeft.qat import fake_quant as R

    torch.manual_seed(4)
    g32 = R.WeightQuant("int", 4, 32)
    shapes = [(2048, 32), (1024, 32), (1024, 32), (1024, 64), (3072, 32), (3072, 32), (1024, 96)] * 28
    cases = [(shape, g32, torch.bfloat16) for shape in shapes + [(151936, 32)]]
    cases += [
        ((512, 24), spec, dtype)
        for spec in (R.WeightQuant("int", 4, 32, scale_dtype=torch.float32), R.WeightQuant("int", 4, None))
        for dtype in (torch.float32, torch.float16)
    ]
    cases.append(((512, 24), R.WeightQuant("int", 4, 32, eps=258 * 2.0**-24, scale_dtype=torch.float16), torch.float16))
    bank = L.ScaleBank()
    pairs = []
    for shape, spec, dtype in cases:
        init = torch.rand(shape, device=device) * 0.01 + 1e-4
        log = torch.nn.Parameter(torch.randn(shape, device=device) * 0.3)
        with torch.no_grad():
            log.view(-1)[:2] = torch.tensor([-120.0, 95.0])  # clamped at eps; inf
        bank.entry().track(init, log, spec, dtype)
        pairs.append((init, log, spec, dtype))

    def mismatches() -> int:
        bad = 0
        for e, (init, log, spec, dtype) in zip(bank.entries, pairs):
            got, ref = e.get(init, log, spec, dtype), R.learned_scale(init, log.detach(), spec, dtype)
            bad += int(got.dtype != ref.dtype or not torch.equal(got, ref))
        return bad

    res = [dict(check=f"scale bank == learned_scale, {len(pairs)} quantizers", mismatches=mismatches())]
    opt = torch.optim.AdamW([log for i, (_, log, _, _) in enumerate(pairs) if i % 3], lr=0.05, fused=device == "cuda")
    for i, (_, log, _, _) in enumerate(pairs):
        log.grad = torch.randn_like(log) if i % 3 else None
    opt.step()
    before = bank.refreshes
    res.append(
        dict(
            check=f"scale bank == learned_scale after a{' fused' if device == 'cuda' else 'n'} AdamW step on 2/3",
            mismatches=mismatches(),
            refreshes=bank.refreshes - before,
        )
    )
    for r in res:
        r["ok"] = r["mismatches"] == 0 and r.get("refreshes", 1) == 1
    if device != "cuda":
        return res
    from triton.testing import do_bench

    timed = L.ScaleBank()
    for init, log, spec, dtype in pairs[:197]:
        timed.entry().track(init, log, spec, dtype)

    def refresh():
        for e in timed.entries:
            e.key = None  # as after an optimizer step
        timed.refresh()

    def per_quantizer():
        for init, log, spec, dtype in pairs[:197]:
            R.learned_scale(init, log.detach(), spec, dtype)

    for label, fn in (("bank refresh", refresh), ("learned_scale per quantizer", per_quantizer)):
        ms = do_bench(fn, warmup=5, rep=50, return_mode="median")
        res.append(dict(check=f"time learned scales of 197 quantizers: {label}", ms=ms, ok=True))
    return res


# --- orchestration -----------------------------------------------------------------------------------------------


def _launch(spec: dict, timeout: int) -> dict:
    return _launch_script(spec, timeout, script=__file__)


def _merge_repeats(results: list[dict]) -> list[dict]:
    """One row per configuration: the median step time over its repeats (each a separate process), the largest peak."""
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r["mode"], r["impl"])
        if "error" in r or key not in rows or "error" in rows[key]:
            rows.setdefault(key, dict(r))
            if "error" in rows[key] and "error" not in r:
                rows[key] = dict(r)
        if "error" not in r:
            rows[key].setdefault("_steps", []).append(r["step_ms"])
            rows[key]["peak_gib"] = max(rows[key]["peak_gib"], r["peak_gib"])
    for row in rows.values():
        steps = row.pop("_steps", None)
        if steps:
            row["step_ms_repeats"] = steps
            row["step_ms"] = statistics.median(steps)
            row["tokens_per_s"] = row["batch"] * row["seq"] / (row["step_ms"] / 1e3)
    return list(rows.values())


def _table(results: list[dict]) -> str:
    rows = [
        "| mode | impl | QAT | weight scale | tokens/s | step ms | peak GiB | first / final loss | "
        "vs same impl w/o QAT | peak vs w/o QAT | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["mode"], r["impl"]): r for r in results if "error" not in r}
    for r in results:
        qat_name = SCHEME[r["mode"]] if r["impl"] in BASE_IMPL else "-"
        scale = r.get("weight_scale") or WEIGHT_SCALE.get(r["impl"]) or "-"
        if "error" in r:
            rows.append(f"| {r['mode']} | {r['impl']} | {qat_name} | {scale} | error: {r['error'][:150]} ||||||")
            continue
        ratio = mem = target = "-"
        if r["impl"] in BASE_IMPL:
            base = by.get((r["mode"], BASE_IMPL[r["impl"]]))
            if base:
                rr = r["tokens_per_s"] / base["tokens_per_s"]
                mm = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else float("nan")
                r["ratio_vs_no_qat"], r["peak_ratio_vs_no_qat"] = rr, mm
                ratio, mem = f"{rr:.2f}x", f"{(mm - 1) * 100:+.1f}%"
                if r["impl"] in ("edgeft_qat", "edgeft_qat_mse"):
                    ok = rr >= TARGET_RATIO[r["mode"]] and mm <= MEMORY_BUDGET
                    target = f"{'met' if ok else 'MISSED'} (>= {TARGET_RATIO[r['mode']]:.2f}x, <= +10%)"
                if r["impl"] == "edgeft_qat":
                    hq = by.get((r["mode"], "hf_qat"))
                    if hq:
                        r["speedup_vs_torchao_qat"] = r["tokens_per_s"] / hq["tokens_per_s"]
                        r["first_loss_rel_diff_vs_torchao_qat"] = abs(r["losses"][0] / hq["losses"][0] - 1)
                        target += (
                            f"; {r['speedup_vs_torchao_qat']:.2f}x torchao QAT, step-1 loss within "
                            f"{r['first_loss_rel_diff_vs_torchao_qat']:.1e}"
                        )
            ab = by.get((r["mode"], "edgeft_qat")) if r["impl"] == "edgeft_qat_mse" else None
            if ab:
                r["ratio_vs_absmax_qat"] = r["tokens_per_s"] / ab["tokens_per_s"]
                r["peak_ratio_vs_absmax_qat"] = r["peak_gib"] / ab["peak_gib"] if ab["peak_gib"] else float("nan")
                target += (
                    f"; {r['ratio_vs_absmax_qat']:.2f}x absmax QAT, peak "
                    f"{(r['peak_ratio_vs_absmax_qat'] - 1) * 100:+.1f}%"
                )
        rows.append(
            f"| {r['mode']} | {r['impl']} | {qat_name} | {scale} | {r['tokens_per_s'] / 1e3:.1f}k | "
            f"{r['step_ms']:.0f} | {r['peak_gib']:.2f} | {r['losses'][0]:.4f} / {r['final_loss']:.4f} | "
            f"{ratio} | {mem} | {target} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="qwen3-0.6b", help=",".join(MODELS))
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--impls", default="hf,hf_qat,edgeft,edgeft_qat")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--checkpoint",
        default="offload",
        help="edgeft checkpoint mode: offload|plain|off (off: no checkpointing anywhere, HF included)",
    )
    ap.add_argument(
        "--check",
        nargs="?",
        const="all",
        choices=["all", "mse", "learned"],
        help="GPU correctness of the QAT kernels first (mse: only the mse-scale weight kernels, with "
        "kernel timings of absmax vs mse; learned: convert == fake quant with learned scales, and the "
        "learned-scale kernels against their references, timed)",
    )
    ap.add_argument("--profile", default="", help="comma list mode:impl to profile one step of (after timing)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every configuration this many times, round-robin, and report the median (the host-bound "
        "0.6B shapes vary by +-25%% between processes)",
    )
    ap.add_argument(
        "--weight-cache",
        default="auto",
        choices=["auto", "weights", "codes", "off"],
        help="edgeft_qat, edgeft_qat_mse: qat.prepare's cache (auto: weights without checkpointing, else codes)",
    )
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for smoke-testing the script")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per configuration")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/qat_overhead-<date>.json)")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / ("qat_overhead-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
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
            "lora": "r=16 alpha=32 dropout=0 on " + ",".join(TARGETS),
            "optimizer": "AdamW(fused=True)",
            "edgeft_checkpointing": args.checkpoint,
            "weight_scales": WEIGHT_SCALE,
            "hf_checkpointing": "transformers, non-reentrant",
            "targets": {
                "lora_ratio": TARGET_RATIO["lora"],
                "full_ratio": TARGET_RATIO["full"],
                "peak_memory": MEMORY_BUDGET,
            },
        },
    }

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(out)

    if args.check:
        try:
            report["check"] = (
                _learned_convert_check() + _learned_kernel_check() + _scale_bank_check()
                if args.check == "learned"
                else run_check(args.check)
            )
        except Exception as e:  # keep the timings even if a check crashes
            report["check"] = [dict(check="crashed", ok=False, error=f"{type(e).__name__}: {e}"[:500])]
        bad = [c for c in report["check"] if not c.get("ok")]
        print(f"check: {len(report['check']) - len(bad)}/{len(report['check'])} ok", flush=True)
        for c in report["check"]:
            if not c.get("ok") or "max_rel_err" in c:
                print("check", json.dumps(c), flush=True)
        save()
    results = []
    modes, impls = args.modes.split(","), args.impls.split(",")
    todo = [(r, mode, impl) for r in range(args.repeats) for mode, impl in RUNS if mode in modes and impl in impls]
    for rep, mode, impl in todo:
        spec = dict(
            model=args.model,
            mode=mode,
            impl=impl,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            checkpoint=args.checkpoint,
            device=args.device,
            repeat=rep,
            profile=rep == 0 and f"{mode}:{impl}" in args.profile.split(","),
            cache=args.weight_cache,
            weight_scale=WEIGHT_SCALE.get(impl),
        )
        res = _launch(spec, args.timeout)
        results.append(res)
        brief = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in res.items()
            if k in ("mode", "impl", "tokens_per_s", "step_ms", "peak_gib", "final_loss", "error", "wall_s")
        }
        print("run", json.dumps(brief), flush=True)
        report["results"] = results
        save()
    report["table"] = _table(_merge_repeats(results))
    save()
    for r in results:
        if r.get("profile"):
            print(f"\n--- profile {r['mode']} {r['impl']} ---\n{r['profile'][:6000]}")
    print(f"\nwrote {out}\n")
    print(report["table"])


if __name__ == "__main__":
    main()
