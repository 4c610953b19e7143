"""bf16 training that loses no update: fp32 master weights behind any optimizer.

:class:`MasterWeights` keeps an fp32 copy of every bf16 (or fp16) trainable tensor as optimizer state
(``state_dict()["state"][i]["master"]``): the model's parameters stay bf16 (what the kernels, FSDP's all-gathers
and the exporters read), the wrapped optimizer updates the masters from the gradients, and each bf16 parameter is
set to its master rounded stochastically (unbiased: the forward follows the masters in expectation); the run saves
the last draw (``master-nearest``: rounded to nearest, kept for benchmarks). fp32 parameters (LoRA adapters,
learned QAT scales) are their own masters; an fp32 run gets the plain optimizer. Checkpoints hold the masters, so
a resumed run continues bit-exactly; FSDP2 gathers and scatters them with the moments; a checkpoint without masters
starts them from its bf16 weights.

``build_optimizer(..., bf16_update="pure")`` (API only, for the benchmarks) is the plain optimizer on the bf16
weights. Why masters, and what was measured: docs/precision.md.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch

# "master": fp32 masters, each bf16 weight a stochastic rounding of its master (the default); "master-nearest": the
# same rounded to nearest (the default before: the forward lags the masters); "pure": no masters (benchmarks only)
BF16_UPDATES = ("master", "master-nearest", "pure")
MASTER_KEY = "master"
ROUND_STEP_KEY = "rounding_step"  # in every param group: the copy-backs so far, which key their random bits
ROUND_CHUNK = 1 << 24  # elements per random stream: a shard draws only the streams its elements fall in


def _stream_seed(seed: int, step: int, tensor: int, chunk: int, extra: tuple = ()) -> int:
    """A generator seed per (run seed, step, tensor, chunk), so that the rounding needs no RNG state of its own."""
    key = "/".join(str(v) for v in (seed, step, tensor, chunk, *extra)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def stochastic_round_(
    dst: torch.Tensor,
    src: torch.Tensor,
    seed: int,
    step: int,
    tensor: int,
    offset: int = 0,
    total: int | None = None,
    extra: tuple = (),
) -> None:
    """``dst`` (bf16) = ``src`` (fp32, contiguous) rounded stochastically: up to the next bf16 number with probability
    equal to the fraction of a bf16 step ``src`` lies above the one below, so that the expected ``dst`` is ``src``.

    The random bits come from streams of :data:`ROUND_CHUNK` elements, each from a generator seeded by ``seed``,
    ``step``, ``tensor`` and the chunk (:func:`_stream_seed`): deterministic (a resumed run draws what it would have),
    and when ``src`` is the block of elements ``[offset, offset + numel)`` of a tensor of ``total`` elements (an FSDP
    row shard) it is rounded exactly as that tensor would be in one process. Each stream is drawn whole (a CUDA
    generator's numbers depend on how many are drawn)."""
    n = src.numel()
    total = n + offset if total is None else total
    out = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
    s, d = src.reshape(-1).view(torch.int32), out.view(-1)
    pos = 0
    while pos < n:
        chunk = (offset + pos) // ROUND_CHUNK
        start = chunk * ROUND_CHUNK
        stop = min(start + ROUND_CHUNK, total)
        take = min(stop - (offset + pos), n - pos)
        gen = torch.Generator(device=src.device).manual_seed(_stream_seed(seed, step, tensor, chunk, extra))
        r = torch.randint(0, 1 << 16, (stop - start,), generator=gen, dtype=torch.int32, device=src.device)
        r = r[offset + pos - start : offset + pos - start + take]
        # fp32 bits + 16 random bits below bf16's last one, truncated: a carry (rounding away from zero) happens
        # with probability (the dropped bits) / 2^16; the truncated value is a bf16 number, converted exactly
        r.add_(s[pos : pos + take]).bitwise_and_(-65536)
        d[pos : pos + take].copy_(r.view(torch.float32))
        pos += take
    if out is not dst:
        dst.copy_(out)


def _local_block(t: torch.Tensor) -> tuple[torch.Tensor, int, int, tuple]:
    """This process's elements of ``t`` (a DTensor's local shard), their offset in the whole tensor's flat order and
    its size, and a key for shards that are not a block of whole rows (they get random streams of their own)."""
    local = getattr(t, "_local_tensor", None)
    if local is None:
        return t, 0, t.numel(), ()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = math.prod(t.shape[1:])
    if tuple(shape[1:]) == tuple(t.shape[1:]):  # rows [off[0], off[0] + shape[0]): FSDP's Shard(0)
        return local, off[0] * row, t.numel(), ()
    return local, 0, local.numel(), ("shard", *off)


def _is_low_precision(p: torch.Tensor) -> bool:
    return p.dtype in (torch.bfloat16, torch.float16)


def update_state_bytes(param_bytes: int, dtype: str, bf16_update: str = "master") -> int:
    """Bytes that training adds per trained tensor of ``param_bytes`` bytes (AdamW): its gradient and two moments,
    plus in bf16 with masters an fp32 master, and moments in fp32 (4 + 4 + 4 bytes per 2 bytes of weight)."""
    if dtype == "bf16" and bf16_update.startswith("master"):  # "pure": gradient and moments in bf16
        return param_bytes + 6 * param_bytes  # bf16 gradient; fp32 master, exp_avg, exp_avg_sq
    return 3 * param_bytes


def needs_masters(params: list[torch.Tensor]) -> bool:
    """Whether any trainable tensor is bf16/fp16 (an fp32 run needs no masters)."""
    return any(_is_low_precision(p) for p in params)


class MasterWeights(torch.optim.Optimizer):
    """``build(groups)``'s optimizer run on fp32 masters of this optimizer's (bf16) parameters.

    ``param_groups`` hold the model's parameters and every hyperparameter of the wrapped optimizer's groups (a
    scheduler changes ``lr`` here; each ``step`` passes them on). ``state[p]`` is ``{"master": fp32 tensor}`` plus the
    wrapped optimizer's state of that master. ``step`` frees the bf16 gradients as it converts them.

    The masters (and the wrapped optimizer) are made at the first ``step``, ``state_dict`` or ``load_state_dict``
    from the parameters' values then, so weights loaded after construction (a resumed checkpoint, FSDP2's sharded
    load) are what the masters start from; ``state`` stays empty until the first step, as torch's optimizers do.
    """

    def __init__(
        self,
        groups: list[dict[str, Any]],
        build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        rounding: str = "stochastic",
        seed: int = 0,
    ):
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', not {rounding!r}")
        self._build = build
        self.rounding = rounding
        self.seed = int(seed)
        self.inner: torch.optim.Optimizer | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        super().__init__([dict(g, params=list(g["params"])) for g in groups], {ROUND_STEP_KEY: 0})

    def _ensure(self) -> torch.optim.Optimizer:
        if self.inner is not None:
            return self.inner
        inner_groups = []
        for g in self.param_groups:
            # a new fp32 leaf (a DTensor of the same sharding under FSDP2); an fp32 parameter is its own master
            masters = [p.detach().float().requires_grad_(True) if _is_low_precision(p) else p for p in g["params"]]
            inner_groups.append(dict({k: v for k, v in g.items() if k != "params"}, params=masters))
        self.inner = self._build(inner_groups)
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            for k, v in ig.items():
                if k != "params":
                    g.setdefault(k, v)  # the wrapped optimizer's defaults (betas, eps, ...) for state_dict
        self._pairs = [
            (p, m)
            for g, ig in zip(self.param_groups, self.inner.param_groups)
            for p, m in zip(g["params"], ig["params"])
        ]
        self._index = {id(p): i for i, (p, _) in enumerate(self._pairs)}  # keys each tensor's random streams
        return self.inner

    def _refresh_state(self) -> None:
        """``state``: per parameter its master (when it has one) and the wrapped optimizer's state of it."""
        self.state.clear()
        for p, m in self._pairs:
            s = dict(self.inner.state.get(m, {}))
            if m is not p:
                s[MASTER_KEY] = m
            if s:
                self.state[p] = s

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: D102 - torch's
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inner = self._ensure()
        for g, ig in zip(self.param_groups, inner.param_groups):
            for k, v in g.items():
                if k != "params":
                    ig[k] = v
        copied = []
        for p, m in self._pairs:
            if m is p:
                continue
            if p.grad is not None:
                m.grad = p.grad.float()
                p.grad = None  # the bf16 gradient is spent: free it before the optimizer's work
            copied.append((p, m))
        inner.step()
        step = self.param_groups[0][ROUND_STEP_KEY] + 1
        for g in self.param_groups:
            g[ROUND_STEP_KEY] = step
        with torch.no_grad():
            for p, m in copied:
                if m.grad is not None:
                    self._round(p, m, step)
                    m.grad = None
        self._refresh_state()
        return loss

    def _round(self, p: torch.Tensor, m: torch.Tensor, step: int) -> None:
        """``p`` = its master rounded: stochastically, with the random bits of ``step`` (and of ``p``'s position), or
        to nearest."""
        if self.rounding == "nearest" or p.dtype != torch.bfloat16:  # fp16 weights: to nearest
            p.copy_(m)
            return
        index = self._index[id(p)]
        mloc, offset, total, extra = _local_block(m)
        ploc = getattr(p, "_local_tensor", p)
        stochastic_round_(ploc, mloc, self.seed, step, index, offset, total, extra)

    def round_to_nearest(self) -> int:
        """Set every bf16 parameter to its master rounded to nearest (what a ``master-nearest`` run saves; a stochastic
        run keeps its last draw, which unlike this keeps the moves below half a bf16 step). Returns how many."""
        self._ensure()
        n = 0
        with torch.no_grad():
            for p, m in self._pairs:
                if m is not p:
                    p.copy_(m)
                    n += 1
        return n

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - torch's
        super().zero_grad(set_to_none)
        if self.inner is not None:
            self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """torch's format over this optimizer's parameters; each bf16 parameter's state adds its fp32 ``master``."""
        inner = self._ensure().state_dict()
        state = {}
        for i, (p, m) in enumerate(self._pairs):
            s = dict(inner["state"].get(i, {}))
            if m is not p:
                s[MASTER_KEY] = m
            if s:
                state[i] = s
        # hyperparameters from this optimizer's groups: a scheduler has set the next step's lr here, the wrapped
        # optimizer only gets it at that step
        groups = [
            dict({k: v for k, v in g.items() if k != "params"}, params=ig["params"])
            for g, ig in zip(self.param_groups, inner["param_groups"])
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Masters and the wrapped optimizer's state back, masters kept fp32; without saved masters (an older
        checkpoint) they restart from the parameters' current values. The parameters are set to their masters
        rounded as the saved step rounded them (the same random bits: what was saved beside them), whatever
        happened to them since (FSDP2's loading steps once)."""
        inner = self._ensure()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)
        ):
            raise ValueError("loaded state dict's parameter groups do not match the optimizer's")
        step = int(groups[0].get(ROUND_STEP_KEY, 0))  # 0: a checkpoint from before the stochastic rounding
        ids = [i for g in groups for i in g["params"]]
        inner_state = {}
        with torch.no_grad():
            for pos, (i, (p, m)) in enumerate(zip(ids, self._pairs)):
                s = dict(state_dict["state"].get(i, {}))
                saved = s.pop(MASTER_KEY, None)
                if m is not p:
                    if saved is not None:
                        m.copy_(saved)
                        self._round(p, m, step)
                    else:
                        m.copy_(p)
                if s:
                    inner_state[pos] = s
        inner_groups, pos = [], 0
        for g in groups:
            inner_groups.append(dict(g, params=list(range(pos, pos + len(g["params"])))))
            pos += len(g["params"])
        inner.load_state_dict({"state": inner_state, "param_groups": inner_groups})
        for g, ig in zip(self.param_groups, inner.param_groups):
            g.update({k: v for k, v in ig.items() if k != "params"})
            g[ROUND_STEP_KEY] = step
        self._refresh_state()

    def masters_into_params(self) -> int:
        """Give every bf16 parameter its fp32 master as data (in place: modules keep their parameters), so the model
        leaves training with every update, not only those that crossed half a bf16 step. Returns how many. The
        optimizer is spent afterwards (its masters are the parameters' data now)."""
        self._ensure()
        n = 0
        with torch.no_grad():
            for p, m in self._pairs:
                if m is not p:
                    p.data = m.detach()
                    n += 1
        return n

    def master_bytes(self) -> int:
        """Bytes of the fp32 master copies (the memory this costs beyond the wrapped optimizer's own state)."""
        self._ensure()
        return sum(m.numel() * m.element_size() for p, m in self._pairs if m is not p)

    def __repr__(self) -> str:
        n = sum(1 for p, m in self._pairs if m is not p)
        return f"MasterWeights({n} fp32 masters, {type(self.inner).__name__ if self.inner else 'not built yet'})"
