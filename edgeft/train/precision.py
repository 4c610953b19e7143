"""bf16 training that loses no update: fp32 master weights behind any optimizer (docs/precision.md).

A bf16 weight has 8 significant bits: near 0.03 its step is 1.2e-4, so an AdamW update of about the learning rate
(2e-5 for full fine-tuning) rounds back to the same weight. Applied to SmolLM2-135M's projection weights, one
lr-sized step changes 3.7% of them at lr 2e-5. :class:`MasterWeights` keeps an fp32 copy of every bf16 (or fp16)
trainable tensor for the optimizer: the model's parameters stay bf16 (what the kernels, FSDP's all-gathers and the
exporters read), their gradients are moved into the fp32 masters, the wrapped optimizer (fused AdamW, SGD,
bitsandbytes' 8-bit/paged AdamW; its moments then fp32 too) updates the masters, and each bf16 parameter is set to
its master rounded to nearest. The run saves the bf16 weights, the model its forward trained: the masters hold the
moves its bf16 weights have not shown yet (a move shows once it crosses half a bf16 step), pushed on by gradients
that never saw them, and saved instead (``train_loop(keep_masters=True)``) they evaluated worse on SmolLM2
(docs/precision.md). fp32 parameters (LoRA
adapters, which peft keeps fp32 on a bf16 base; learned QAT scales) are their own masters: nothing is copied for
them, and an fp32 run gets the plain optimizer.

The masters are optimizer state (``state_dict()["state"][i]["master"]``), so checkpoints hold them and a resumed run
continues bit-exactly, and FSDP2's optimizer state-dict helpers gather and scatter them with the moments (a master of
a sharded DTensor parameter is a DTensor of the same sharding). ``load_state_dict`` keeps them fp32 (torch's
``Optimizer.load_state_dict`` casts state to the parameter's dtype). A checkpoint without masters (written before
they existed) starts them from the loaded bf16 weights.

``build_optimizer(..., bf16_update="pure")`` (API only, for the benchmarks) is the update before masters: the plain
optimizer on the bf16 weights. docs/precision.md compares the options measured (stochastic rounding, Kahan
summation) and why masters are the one kept.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

BF16_UPDATES = ("master", "pure")
MASTER_KEY = "master"


def _is_low_precision(p: torch.Tensor) -> bool:
    return p.dtype in (torch.bfloat16, torch.float16)


def update_state_bytes(param_bytes: int, dtype: str, bf16_update: str = "master") -> int:
    """Bytes that training adds per trained tensor of ``param_bytes`` bytes (AdamW): its gradient and two moments,
    plus in bf16 with masters an fp32 master, and moments in fp32 (4 + 4 + 4 bytes per 2 bytes of weight)."""
    if dtype == "bf16" and bf16_update == "master":  # "pure": gradient and moments in bf16
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

    def __init__(self, groups: list[dict[str, Any]], build: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        self._build = build
        self.inner: torch.optim.Optimizer | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        super().__init__([dict(g, params=list(g["params"])) for g in groups], {})

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
        self._pairs = [(p, m) for g, ig in zip(self.param_groups, self.inner.param_groups)
                       for p, m in zip(g["params"], ig["params"])]
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
        with torch.no_grad():
            for p, m in copied:
                if m.grad is not None:
                    p.copy_(m)  # round to nearest
                    m.grad = None
        self._refresh_state()
        return loss

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
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=ig["params"])
                  for g, ig in zip(self.param_groups, inner["param_groups"])]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Masters and the wrapped optimizer's state back, masters kept fp32; without saved masters (an older
        checkpoint) they restart from the parameters' current values. The parameters are set to their masters
        rounded: what was saved beside them, whatever happened to them since (FSDP2's loading steps once)."""
        inner = self._ensure()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict's parameter groups do not match the optimizer's")
        ids = [i for g in groups for i in g["params"]]
        inner_state = {}
        with torch.no_grad():
            for pos, (i, (p, m)) in enumerate(zip(ids, self._pairs)):
                s = dict(state_dict["state"].get(i, {}))
                saved = s.pop(MASTER_KEY, None)
                if m is not p:
                    if saved is not None:
                        m.copy_(saved)
                        p.copy_(m)
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
