"""The training loop: gradient accumulation normalised over the whole window, schedules, logging.

The loss of an optimizer step is the sum of per-token cross-entropies over every micro-batch of the
accumulation window divided by the window's total number of target tokens, so accumulating k micro-batches
equals one batch k times larger (the common mistake is averaging per micro-batch, which over-weights short
examples).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.data import IGNORE_INDEX, collate
from edgeft.errors import EdgeftError

from .optim import build_optimizer, build_scheduler


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, if any."""
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if base is not None and base is not model else model


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) and the number of target tokens of one micro-batch.

    With the fused-kernel patch active (``_edgeft_fused_ce`` on the transformers model), the logits are
    never materialised: the backbone's hidden states go straight into the chunked linear + cross-entropy.
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    inner = _inner_model(model)
    if getattr(inner, "_edgeft_fused_ce", False):
        from edgeft.kernels import lm_head_loss

        # PEFT injects its layers into the backbone in place, so calling it directly keeps the adapters
        hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        head = inner.get_output_embeddings()
        w = head.weight
        # a QAT-prepared lm_head keeps its fake quantizers: the fused loss must see the deployed grid too
        if getattr(head, "activation_fake_quantizer", None) is not None:
            h = head.activation_fake_quantizer(h)
        if getattr(head, "weight_fake_quantizer", None) is not None:
            w = head.weight_fake_quantizer(w)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        return lm_head_loss(h, w, labels, softcap=softcap)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def backward_window(model: nn.Module, window: list[dict[str, torch.Tensor]], device: str = "cpu") -> tuple[float, int]:
    """Accumulate gradients of one optimizer step's micro-batches; returns (mean loss per target token, targets).

    Each micro-batch's summed loss is divided by the target count of the *whole* window before backward, so
    the accumulated gradient is that of the mean over every target token in the window.
    """
    n_target = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
    if n_target == 0:
        raise EdgeftError("a batch has no target tokens")
    total = 0.0
    for b in window:
        b = {k: v.to(device) for k, v in b.items()}
        loss_sum, _ = lm_loss_sum(model, b)
        (loss_sum / n_target).backward()
        total += float(loss_sum.detach())
    return total / n_target, n_target


def _batches(n_examples: int, batch_size: int, seed: int):
    """Endless seeded epochs of shuffled index batches (the last short batch of an epoch is kept)."""
    rng = random.Random(seed)
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        for i in range(0, n_examples, batch_size):
            yield order[i : i + batch_size]


def train_loop(
    model: nn.Module,
    examples: list[dict[str, list[int]]],
    *,
    pad_id: int,
    max_steps: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
    seed: int = 42,
    device: str = "cpu",
    metrics_path: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Train ``model`` in place for ``max_steps`` optimizer steps; returns a summary.

    One line per optimizer step goes to ``metrics_path`` (JSONL: step, loss, lr, target tokens, tokens/s).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise EdgeftError("the model has no trainable parameters")
    opt = build_optimizer(model, lr, weight_decay)
    warmup = int(round(warmup_ratio * max_steps))
    sched = build_scheduler(opt, max_steps, warmup, schedule)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches(len(examples), batch_size, seed)
    metrics_f = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115 - closed below
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, desc=desc, unit="step", dynamic_ncols=True)
    model.train()
    t_start = time.perf_counter()
    history: list[float] = []
    try:
        for step in range(max_steps):
            t0 = time.perf_counter()
            window = [collate([examples[i] for i in next(batches)], pad_id) for _ in range(grad_accum)]
            n_input = sum(int(b["attention_mask"].sum()) for b in window)
            loss, n_target = backward_window(model, window, device)
            if not math.isfinite(loss):
                raise EdgeftError(
                    f"loss became {loss} at step {step + 1}; lower the learning rate "
                    "(or use bf16/fp32 instead of fp16, which overflows)"
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
            cur_lr = sched.get_last_lr()[0]
            sched.step()
            dt = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": loss,
                "lr": cur_lr,
                "grad_norm": grad_norm,
                "target_tokens": n_target,
                "tokens_per_s": n_input / dt,
                "elapsed_s": time.perf_counter() - t_start,
            }
            history.append(loss)
            if metrics_f:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{cur_lr:.2e}", tok_s=f"{n_input / dt:.0f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if metrics_f:
            metrics_f.close()
    model.eval()
    return {
        "steps": max_steps,
        "first_loss": history[0],
        "final_loss": history[-1],
        "seconds": time.perf_counter() - t_start,
    }
