"""bf16 weight updates compared on a problem with many small steps: which one follows fp32 training?

A linear layer with LLM-like weights (N(0, 0.02): bf16 spacing 6e-5 to 2.4e-4 around |w| 0.01-0.04) is fitted by
AdamW at lr 2e-5 (edgeft's full fine-tuning default: most single steps are below half a bf16 step) to a target
that moves every weight by about 1e-3 in total; the bf16 variants see bf16 inputs and get bf16 gradients (products
summed in fp32, as on tensor cores). Updates:

- ``fp32``: fp32 weights and compute (the reference);
- ``pure``: bf16 weights, the optimizer writes bf16 (edgeft before issue 14: fused AdamW, bf16 moments);
- ``master``: bf16 weights, fp32 master weights and fp32 AdamW state (edgeft's ``MasterWeights``);
- ``stochastic``: bf16 weights and moments, torchao's AdamW with bf16 stochastic rounding;
- ``kahan``: bf16 weights and moments with a bf16 Kahan compensation buffer (as torch-optimi does), written here.

Reports the share of the starting loss left (the optimum is 0; bf16 weights cannot represent the target exactly),
the distance of the weights from fp32's trajectory relative
to how far fp32's moved, the share of weights that moved, and the optimizer's bytes per trained parameter
(weights + gradient + state). Writes ``bench/results/precision_options-<date>.json``.

    python bench/precision_options.py            # ~3 min on one CPU core (torchao compiles its step once)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BYTES = {"fp32": 4 + 4 + 8, "pure": 2 + 2 + 4, "master": 2 + 2 + 4 + 8, "stochastic": 2 + 2 + 4, "kahan": 2 + 2 + 4 + 2}


class KahanAdamW(torch.optim.Optimizer):
    """AdamW on bf16 weights and moments whose rounding error is carried in a bf16 compensation buffer."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), c=torch.zeros_like(p))
                st["step"] += 1
                t, gr = st["step"], p.grad.float()
                m = st["m"].float().lerp_(gr, 1 - b1)
                v = st["v"].float().lerp_(gr * gr, 1 - b2)
                st["m"].copy_(m)
                st["v"].copy_(v)
                upd = -g["lr"] * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + g["eps"])
                upd -= g["lr"] * g["weight_decay"] * p.float()
                y = upd + st["c"].float()  # the update plus what earlier roundings lost
                new = (p.float() + y).to(p.dtype)
                st["c"].copy_(y - (new.float() - p.float()))  # what this rounding lost
                p.copy_(new)


def make_optimizer(kind: str, layer: nn.Module, lr: float) -> torch.optim.Optimizer:
    from edgeft.training.optim import build_optimizer

    if kind in ("fp32", "master", "pure"):
        return build_optimizer(layer, lr, 0.0, "adamw", bf16_update="master" if kind == "fp32" else kind)
    if kind == "stochastic":
        import torchao.optim as tao

        cls = getattr(tao, "AdamW", None) or tao._AdamW
        return cls(layer.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, bf16_stochastic_round=True)
    if kind == "kahan":
        return KahanAdamW(layer.parameters(), lr=lr)
    raise ValueError(kind)


def run(kind: str, steps: int, lr: float, width: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(width, width, generator=g) * 0.02).bfloat16().float()  # the same start in every variant
    target = w0 + torch.randn(width, width, generator=g) * 1e-3
    x = torch.randn(8 * width, width, generator=g)
    y = x @ target.T
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    layer = nn.Linear(width, width, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(w0)
    opt = make_optimizer(kind, layer, lr)
    xs = x.to(dtype).float()  # the inputs as a bf16 model sees them
    losses = []
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        # the product as tensor cores compute it (bf16 values, fp32 sums); the weight's gradient arrives in its dtype
        loss = ((xs @ layer.weight.float().T - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    w = layer.weight.detach().float()
    with torch.no_grad():
        final = float(((x @ w.T - y) ** 2).mean())  # in fp32 for every variant
    return {
        "update": kind,
        "final_loss": final,
        "first_loss": losses[0],
        "w": w,
        "w0": w0,
        "moved_share": float((w != w0).float().mean()),
        "seconds": time.perf_counter() - t0,
        "bytes_per_param": BYTES[kind],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--updates", default="fp32,pure,master,stochastic,kahan")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = [run(k, args.steps, args.lr, args.width) for k in args.updates.split(",")]
    ref = next(r for r in res if r["update"] == "fp32")
    travelled = float((ref["w"] - ref["w0"]).norm())
    rows = []
    for r in res:
        row = {k: v for k, v in r.items() if k not in ("w", "w0")}
        row["distance_to_fp32"] = float((r["w"] - ref["w"]).norm()) / travelled
        row["loss_left"] = r["final_loss"] / r["first_loss"]  # share of the starting loss not yet fitted
        rows.append(row)
    out = {
        "bench": "precision_options",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "settings": vars(args),
        "results": rows,
        "note": "distance_to_fp32: ||W - W_fp32|| / ||W_fp32 - W_0||; bytes_per_param: weight + gradient + "
        "optimizer state (AdamW), the masters' fp32 gradient copy transient not counted",
    }
    dest = ROOT / "bench" / "results" / f"precision_options-{dt.date.today():%Y%m%d}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'update':11} {'loss left':>9} {'dist':>7} {'moved':>7} {'B/param':>7}")
    for r in rows:
        print(
            f"{r['update']:11} {r['loss_left']:9.2e} {r['distance_to_fp32']:7.3f} "
            f"{100 * r['moved_share']:6.1f}% {r['bytes_per_param']:7d}"
        )
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
