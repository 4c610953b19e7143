"""The training loop: exact gradient accumulation, evaluation and early stopping, resumable checkpoints.

The loss of an optimizer step is the sum of per-token cross-entropies over every micro-batch of the accumulation
window (on every process) divided by the window's total number of target tokens, so accumulating k micro-batches
equals one batch k times larger (the common mistake is averaging per micro-batch, which over-weights short examples).

Resuming is exact: the data order of epoch e is a pure function of (seed, e), so the sampler's position is two
integers; together with the model's trainable tensors, optimizer and scheduler states and RNG states (see
checkpoint.py) a run killed at any point continues with the same losses it would have had.

Several processes (torchrun): DDP by default, or FSDP2 (``Placement(strategy="fsdp")``, fsdp.py): the model is sharded
inside :class:`LossModule`, every forward goes through it (evaluation too, the same number of batches on every
rank, since each forward gathers weights from all ranks) and checkpoints gather the trainable tensors on rank 0.
Under FSDP the model (and a distillation teacher) may come unloaded, on the meta device, on ranks other than 0:
sharding fills every rank's shards from rank 0's weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.data import IGNORE_INDEX, Batcher
from edgeft.errors import EdgeftError
from edgeft.fsutil import write_text
from edgeft.kernels.patch import transformers_model

from .checkpoint import load_trainable, rng_state, trainable_state
from .distill import Distillation, _forward_kwargs
from .distributed import DistInfo, all_reduce_sum, gather_objects
from .fsdp import clip_grad_norm
from .optim import build_optimizer, build_scheduler, precision_record, warmup_steps_for
from .precision import MasterWeights
from .report import Reporter
from .settings import Checkpointing, Evaluation, Optimization, Placement, Reporting, TrainData


def _dtype_name(params: list[torch.Tensor]) -> str:
    """The trained tensors' dtypes, e.g. "bf16" or "bf16+fp32" (bf16 modules_to_save beside fp32 LoRA adapters)."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return "+".join(sorted({names.get(p.dtype, str(p.dtype)) for p in params}))


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) and the number of target tokens of one micro-batch.

    Batches are padded (``attention_mask``) or flattened (``position_ids`` restarting per example, no mask). With
    the fused-kernel patch active (``_edgeft_fused_ce`` on the transformers model), the logits are never
    materialised: the backbone's hidden states go straight into the chunked linear + cross-entropy.
    """
    labels = batch["labels"][:, 1:].reshape(-1)
    inner = transformers_model(model)
    if getattr(inner, "_edgeft_fused_ce", False):
        from edgeft.kernels import lm_head_loss
        from edgeft.kernels.patch import head_copy_chunk_rows, lm_head_operands

        # PEFT injects its layers into the backbone in place, so calling it directly keeps the adapters
        hidden = inner.model(**_forward_kwargs(batch)).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        head = inner.get_output_embeddings()
        # a QAT-prepared lm_head keeps its fake quantizers: the fused loss must see the deployed grid too; the
        # fake-quantized copy of the head weight comes out of the loss's chunk budget
        h, w = lm_head_operands(head, h)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        return lm_head_loss(h, w, labels, softcap=softcap, chunk_rows=head_copy_chunk_rows(head, h, w))
    logits = model(**_forward_kwargs(batch)).logits
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


class LossModule(nn.Module):
    """``forward(**batch)`` -> summed token loss: what DDP wraps, so its gradient hooks see every forward.

    With ``distill`` it returns the micro-batch's share of the distillation objective instead, for the window
    counts set in ``counts`` (n_target, n_positions); the summed CE and KL of the last call are in ``last``.
    """

    def __init__(self, model: nn.Module, distill: Distillation | None = None) -> None:
        super().__init__()
        self.model = model
        self.distill = distill
        self.counts = (1, 1)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if self.distill is None or not self.model.training:  # evaluation (FSDP's goes through here): the CE
            return lm_loss_sum(self.model, batch)[0]
        ce, kl = self.distill.losses(self.model, batch, self.counts)  # the fused path declares the window mix
        self.last = (ce.detach(), kl.detach())
        return self.distill.objective(ce, kl, *self.counts)


def _targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def backward_window(
    model: nn.Module,
    window: list[dict[str, torch.Tensor]],
    device: str = "cpu",
    dist: DistInfo | None = None,
    ddp: nn.Module | None = None,
    distill: Distillation | None = None,
    stats: dict[str, float] | None = None,
) -> tuple[float, int]:
    """Accumulate gradients of one optimizer step's micro-batches; returns (mean loss per target token, targets).

    Each micro-batch's summed loss is divided by the target count of the *whole* window (all processes) before
    backward, so the accumulated gradient is that of the mean over every target token in the window. With
    ``distill`` the gradient is that of the distillation objective (distill.py), normalised the same way over the
    window's targets and distilled positions; the returned loss is still the cross-entropy, and ``stats`` gets
    ``distill_kl`` (mean KL per distilled position) and ``objective``.
    """
    counts = [float(sum(_targets(b) for b in window))]
    if distill is not None:
        counts.append(float(sum(distill.count(b) for b in window)))
    counts = all_reduce_sum(counts, dist, device)
    n_target = int(counts[0])
    if n_target == 0:
        raise EdgeftError("a batch has no target tokens")
    world = dist.world if dist else 1  # DDP averages over processes: undo it
    n_pos = int(counts[1]) if distill is not None else 0
    loss_module = getattr(ddp, "module", ddp)  # DDP wraps the LossModule; FSDP2 shards it in place
    if ddp is not None and distill is not None:
        loss_module.counts = (n_target, n_pos)
    total = kl_total = 0.0
    for i, b in enumerate(window):
        b = {k: v.to(device) for k, v in b.items()}
        sync = ddp is None or i == len(window) - 1 or not hasattr(ddp, "no_sync")  # FSDP: reduce-scatter each
        with contextlib.nullcontext() if sync else ddp.no_sync():
            if distill is None:
                loss_sum = ddp(**b) if ddp is not None else lm_loss_sum(model, b)[0]
                (loss_sum * (world / n_target)).backward()
            else:
                if ddp is not None:
                    obj = ddp(**b)
                    loss_sum, kl = loss_module.last
                else:
                    loss_sum, kl = distill.losses(model, b, (n_target, n_pos))
                    obj = distill.objective(loss_sum, kl, n_target, n_pos)
                (obj * world).backward()
                kl_total += float(kl.detach())
        total += float(loss_sum.detach())
    total, kl_total = all_reduce_sum([total, kl_total], dist, device)
    if stats is not None and distill is not None:
        stats["distill_kl"] = kl_total / max(n_pos, 1)
        stats["objective"] = (1 - distill.weight) * total / n_target + distill.weight * stats["distill_kl"]
    return total / n_target, n_target


class Sampler:
    """Seeded epochs of shuffled unit indices, ``global_batch`` at a time; its state is (epoch, offset).

    The order of epoch e is a pure function of (seed, e), so restoring the position restores the data stream.
    ``drop_last`` (several processes) drops an epoch's short tail so every process gets a full micro-batch.
    """

    def __init__(self, n: int, global_batch: int, seed: int, drop_last: bool = False) -> None:
        if n < (global_batch if drop_last else 1):
            raise EdgeftError(f"{n} training examples are fewer than one global batch of {global_batch}")
        self.n, self.batch, self.seed, self.drop_last = n, global_batch, seed, drop_last
        self.epoch, self.offset = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch if self.drop_last else -(-self.n // self.batch)

    def next(self) -> list[int]:
        end = self.offset + self.batch
        if self.offset >= self.n or (self.drop_last and end > self.n):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
            end = self.batch
        out = self._order[self.offset : end]
        self.offset = end
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.epoch, self.offset = int(st["epoch"]), int(st["offset"])
        self._order = self._epoch_order(self.epoch)


def _metrics_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return rows


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batcher: Batcher,
    batch_size: int,
    device: str = "cpu",
    dist: DistInfo | None = None,
    sharded_root: nn.Module | None = None,
) -> float:
    """Mean loss per target token over every eval unit (sharded over processes).

    ``sharded_root``: the FSDP-sharded :class:`LossModule` around ``model``; every rank then runs the same number
    of forwards (a rank out of units repeats one and discards it), since each forward is a collective.
    """
    was_training = model.training
    model.eval()
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    units = list(range(len(batcher)))[rank::world]
    n_batches = -(-len(units) // batch_size)
    if sharded_root is not None:
        n_batches = -(-(-(-len(batcher) // world)) // batch_size)  # rank 0's count: the most units
    loss = count = 0.0
    for i in range(n_batches):
        chunk = units[i * batch_size : (i + 1) * batch_size]
        b = {k: v.to(device) for k, v in batcher.collate(chunk or [0]).items()}
        if sharded_root is not None:
            s, n = sharded_root(**b), _targets(b)
        else:
            s, n = lm_loss_sum(model, b)
        if chunk:
            loss += float(s)
            count += float(n)
    loss, count = all_reduce_sum([loss, count], dist, device)
    if was_training:
        model.train()
    return loss / max(count, 1.0)


def train_loop(
    model: nn.Module,
    data: TrainData,
    optimization: Optimization,
    *,
    evaluation: Evaluation = Evaluation(),
    checkpointing: Checkpointing = Checkpointing(),
    reporting: Reporting = Reporting(),
    placement: Placement = Placement(),
    distill: Distillation | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place for up to ``optimization.max_steps`` optimizer steps; returns a summary.

    One line per optimizer step goes to ``reporting.metrics_path`` (JSONL: step, loss, lr, grad norm, target
    tokens, tokens/s, and eval_loss on evaluation steps; with ``distill``, the gradient is the distillation
    objective's and the line adds distill_kl and objective); ``on_log`` gets each line too. With
    ``checkpointing.manager`` a checkpoint is written every ``save_steps`` steps, at every new best eval loss and at
    the end; ``resume`` continues from the newest one. With ``placement.dist``, ``strategy`` is "ddp" or "fsdp" (the
    model is sharded in place: rank 0 then gets the trained tensors from
    :func:`edgeft.training.fsdp.full_trainable_state`, a collective). ``optimization.bf16_update``: how bf16
    trainable tensors are updated (optim.py, precision.py; the summary's ``precision`` records it);
    ``keep_masters``: the model ends with its fp32 masters as weights (one process or DDP, unless the best weights
    of an earlier step were restored; measured worse than the bf16 weights on SmolLM2, docs/precision.md, so the
    pipeline does not ask for it).
    """
    opt_s, device, dist, strategy = optimization, placement.device, placement.dist, placement.strategy
    max_steps, batch_size, seed = opt_s.max_steps, opt_s.batch_size, opt_s.seed
    examples, batching, eval_steps = data.examples, data.batching, evaluation.steps
    checkpoints = checkpointing.manager
    if not any(p.requires_grad for p in model.parameters()):
        raise EdgeftError("the model has no trainable parameters")
    is_main = dist is None or dist.is_main
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    sharded = root = None
    if dist is not None and strategy == "fsdp":
        from .fsdp import Sharded

        root = LossModule(model, distill)
        sharded = Sharded(root, model, device, rank)  # before the optimizer: it must hold the sharded parameters
        if distill is not None:
            sharded.shard_frozen(distill.teacher)  # no rank holds the whole teacher either
    opt = build_optimizer(
        model,
        opt_s.lr,
        opt_s.weight_decay,
        opt_s.optimizer,
        opt_s.embedding_lr,
        opt_s.scale_lr,
        opt_s.bf16_update,
        seed=seed,
    )
    sched = build_scheduler(
        opt, max_steps, warmup_steps_for(max_steps, opt_s.warmup_ratio, opt_s.warmup_steps), opt_s.schedule
    )
    params = [p for p in model.parameters() if p.requires_grad]
    batcher = Batcher(examples, batching, data.pad_id, data.max_seq_length, seed)
    sampler = Sampler(len(batcher), batch_size * world, seed, drop_last=world > 1)
    eval_batcher = (
        Batcher(data.eval_examples, batching, data.pad_id, data.max_seq_length, seed) if data.eval_examples else None
    )
    evaluating = eval_batcher is not None and bool(eval_steps)
    state: dict[str, Any] = {
        "step": 0,
        "best_eval": None,
        "best_step": None,
        "bad_evals": 0,
        "stopped": False,
        "first_loss": None,
        "last_loss": None,
        "tokens": 0,
    }
    best_weights: dict[str, torch.Tensor] | None = None

    if checkpoints is not None and is_main:
        checkpoints.clean_partial()
    latest = checkpoints.latest() if (checkpoints is not None and checkpointing.resume) else None

    def snapshot() -> dict[str, torch.Tensor]:
        return sharded.local_state() if sharded is not None else trainable_state(model)

    def restore(tensors: dict[str, torch.Tensor], where: str) -> None:
        if sharded is not None:
            sharded.load(tensors, where)
        else:
            load_trainable(model, tensors, where)

    if latest is not None:
        state.update(checkpoints.load(latest, model, opt, sched, rank, sharded=sharded))
        sampler.load_state_dict(state["sampler"])
        if state["best_step"] is not None and evaluating:
            best_weights = (
                snapshot()
                if state["best_step"] == state["step"]
                else checkpoints.load_tensors(state["best_step"], read=sharded is None or is_main)
            )
            if best_weights is None:
                raise EdgeftError(f"the best checkpoint step-{state['best_step']} is missing from {checkpoints.dir}")
    start = state["step"]
    metrics_f = None
    if reporting.metrics_path and is_main:
        metrics_path = Path(reporting.metrics_path)
        kept = [r for r in _metrics_rows(metrics_path) if r.get("step", 0) <= start] if start else []
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))  # drop steps past the resume point
        metrics_f = open(metrics_path, "a")  # noqa: SIM115 - closed below
    ddp = root
    if dist is not None and sharded is None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            LossModule(model, distill), device_ids=[torch.device(device).index] if device.startswith("cuda") else None
        )
    reporter = Reporter(
        total=max_steps,
        start=start,
        desc=reporting.desc,
        progress=reporting.progress,
        logging_steps=reporting.logging_steps,
        report_to=reporting.report_to,
        log_dir=reporting.log_dir,
        config=reporting.run_config,
        enabled=is_main,
    )
    if start:
        reporter.message(f"resumed from {latest} at step {start}")
    elif checkpointing.resume:
        reporter.message("no checkpoint to resume from: training from step 0")
    if batching == "packed":
        reporter.message(
            f"packing: {len(examples)} examples in {len(batcher)} rows of {data.max_seq_length} "
            f"tokens, {batcher.efficiency:.1%} of tokens valid"
        )

    def save(step: int) -> None:
        if checkpoints is None:
            return
        st = dict(state, sampler=sampler.state_dict())
        rngs = gather_objects(rng_state(), dist)
        gathered = {}
        if sharded is not None:  # collectives: every rank gathers, rank 0 receives
            gathered = {"tensors": sharded.full_trainable_state(), "optimizer_state": sharded.optimizer_state(opt)}
        if is_main:
            checkpoints.save(step, model, opt, sched, st, rngs, **gathered)
        if dist is not None:
            import torch.distributed as tdist

            tdist.barrier()

    model.train()
    t_start = time.perf_counter()
    try:
        for step in range(start, max_steps):
            if state["stopped"]:
                break
            t0 = time.perf_counter()
            window = []
            for _ in range(opt_s.grad_accum):
                ids = sampler.next()
                window.append(batcher.collate(ids[rank * batch_size : (rank + 1) * batch_size]))
            (n_input,) = all_reduce_sum(
                [
                    float(
                        sum(
                            int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                            for b in window
                        )
                    )
                ],
                dist,
                device,
            )
            extra: dict[str, float] = {}
            loss, n_target = backward_window(model, window, device, dist, ddp, distill, extra)
            if not math.isfinite(loss):
                raise EdgeftError(
                    f"loss became {loss} at step {step + 1}; lower the learning rate or raise warmup "
                    "(with fp16 weights, use bf16 or fp32: fp16 overflows)"
                )
            grad_norm = clip_grad_norm(params, opt_s.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            cur_lr = sched.get_last_lr()[0]
            sched.step()
            dt = time.perf_counter() - t0
            state["step"] = step + 1
            state["tokens"] += int(n_input)
            state["first_loss"] = loss if state["first_loss"] is None else state["first_loss"]
            state["last_loss"] = loss
            row: dict[str, Any] = {
                "step": step + 1,
                "loss": loss,
                "lr": cur_lr,
                "grad_norm": grad_norm,
                "target_tokens": n_target,
                "tokens_per_s": n_input / dt,
                "elapsed_s": time.perf_counter() - t_start,
                **extra,
            }
            improved = False
            if evaluating and ((step + 1) % eval_steps == 0 or step + 1 == max_steps):
                ev = evaluate_loss(model, eval_batcher, batch_size, device, dist, sharded_root=root)
                row["eval_loss"] = ev
                if state["best_eval"] is None or ev < state["best_eval"] - evaluation.threshold:
                    state.update(best_eval=ev, best_step=step + 1, bad_evals=0)
                    best_weights = snapshot() if evaluation.load_best else None
                    improved = True
                else:
                    state["bad_evals"] += 1
                    if evaluation.patience and state["bad_evals"] >= evaluation.patience:
                        state["stopped"] = True
                        reporter.message(
                            f"early stopping at step {step + 1}: eval loss did not improve on "
                            f"{state['best_eval']:.4f} (step {state['best_step']}) for "
                            f"{state['bad_evals']} evaluations"
                        )
            if metrics_f:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
            reporter.step(row)
            if on_log is not None:
                on_log(row)
            last = step + 1 == max_steps or state["stopped"]
            every = checkpointing.save_steps
            if checkpoints is not None and (last or improved or (every and (step + 1) % every == 0)):
                save(step + 1)
    finally:
        reporter.close()
        if metrics_f:
            metrics_f.close()
    restored = evaluating and evaluation.load_best and best_weights is not None and state["best_step"] != state["step"]
    if restored:
        restore(best_weights, f"best weights (step {state['best_step']})")
        reporter.message(f"restored the best weights: step {state['best_step']}, eval loss {state['best_eval']:.4f}")
    precision = precision_record(opt, _dtype_name(params))
    if isinstance(opt, MasterWeights):
        precision["weights"] = "bf16"
        if opt_s.keep_masters and sharded is None and not restored:
            opt.masters_into_params()
            precision["weights"] = "fp32 masters"
        elif not restored and opt.rounding == "nearest":
            opt.round_to_nearest()
        # stochastic rounding keeps its last draw: the model the last forward trained, the masters in expectation.
        # Rounded to nearest instead, every master that moved less than half a bf16 step (most, in a short
        # fine-tune) falls back to its start: on SmolLM2 eval loss 1.60 against 1.28 in fp32 (docs/precision.md)
    model.eval()
    return {
        "steps": state["step"],
        "first_loss": state["first_loss"],
        "final_loss": state["last_loss"],
        "best_step": state["best_step"],
        "best_eval_loss": state["best_eval"],
        "stopped_early": state["stopped"],
        "resumed_from": start or None,
        "batching": batching,
        "units": len(batcher),  # examples, or packed rows
        "packing_efficiency": batcher.efficiency if batching == "packed" else None,
        "seconds": time.perf_counter() - t_start,
        "distributed": strategy if dist is not None else None,
        "precision": precision,
    }
