"""The ``pte`` host runtime: an ExecuTorch program run by ExecuTorch's own Python runtime.

This is the program a phone app loads, on the same kernels (XNNPACK delegate, ExecuTorch's custom
``update_cache``/``custom_sdpa`` ops, the quantized embedding kernel), so the evaluator and the exporter's
validation measure the artifact exactly as ExecuTorch computes it. executorch is imported lazily.

The programs edgeft writes (``exporters/pte.py``) take ``tokens [1, n]`` and ``input_pos [n]`` and return
float32 logits ``[1, n, vocab]`` for every input position, with the KV cache inside the program; a program
exported with ``--logits last`` (constant method ``generate_full_logits`` False; a program without the method
is a full-logits one, as every edgeft program before it was) returns ``[1, 1, vocab]`` for the last position
only: it generates (``generate``, ``next_logits``) but cannot give ``logits``/``continuation_logits``, which
refuse it in one line (the evaluator needs every position). The cache
is never cleared: attention at position ``p`` reads the keys of positions ``0..p`` only, so every call that
starts again at ``input_pos[0] = 0`` overwrites what it reads and sees a fresh context. Gemma3's sliding-window
layers may keep a ring (``REWIND_METHOD``): there a continuation longer than that limit overwrites prefix keys
the next one needs, so ``continuation_logits`` runs the prefix again first. Prompts longer than the program's
``get_max_seq_len`` are fed in chunks, as ExecuTorch's runner does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import EdgeftError

# constant method: True when ``forward`` returns logits for every input position, False for the last one only
# (the name of ExecuTorch's own export option for the same choice; ExecuTorch's runner does not read it)
FULL_LOGITS_METHOD = "generate_full_logits"
# constant method of a program whose sliding-window layers keep a ring of window + max_seq_len - 1 rows: a call
# may start again at a position P already written, exactly, only while at most this many positions >= P have
# been written since (more overwrite keys a query at P still needs); absent: no limit
REWIND_METHOD = "get_max_rewind"


def load_executorch_ops() -> None:
    """Register the kernels edgeft's programs use: LLM custom ops (KV cache, sdpa) and quantized ops."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
    except ImportError as e:
        raise EdgeftError(f"running a .pte needs executorch (pip install executorch): {e}") from None


def _scalar_method(program: Any, name: str) -> Any:
    if name not in program.method_names:
        return None
    out = program.load_method(name).execute([])
    return out if len(out) != 1 else out[0]


class PteRuntime:
    """A .pte on ExecuTorch's runtime: full-sequence logits (full-logits programs) and greedy generation."""

    name = "pte"

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        if kwargs:
            raise EdgeftError(f"pte runtime: unknown options {', '.join(sorted(kwargs))}")
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeftError(f".pte file {self.path} does not exist")
        load_executorch_ops()
        from executorch.runtime import Runtime

        try:
            self._program = Runtime.get().load_program(str(self.path))
            self._method = self._program.load_method("forward")
            self.max_seq_len = int(_scalar_method(self._program, "get_max_seq_len"))
            ctx = _scalar_method(self._program, "get_max_context_len")
        except Exception as e:  # a truncated or foreign file: ExecuTorch raises RuntimeError/ValueError
            raise EdgeftError(
                f"ExecuTorch could not load {self.path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        self.max_context_len = int(ctx) if ctx is not None else self.max_seq_len
        self.vocab_size = int(_scalar_method(self._program, "get_vocab_size") or 0)
        eos = _scalar_method(self._program, "get_eos_ids")
        self.eos_ids = (
            {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])} if eos is not None else set()
        )
        bos = _scalar_method(self._program, "get_bos_id")
        self.bos_id = int(bos) if bos is not None else None
        self.dynamic = bool(_scalar_method(self._program, "enable_dynamic_shape"))
        full = _scalar_method(self._program, FULL_LOGITS_METHOD)
        self.full_logits = True if full is None else bool(full)
        self._chunk = self.max_seq_len if self.dynamic else 1
        rewind = _scalar_method(self._program, REWIND_METHOD)
        self.max_rewind = int(rewind) if rewind is not None else self.max_context_len

    def _check_len(self, n: int) -> None:
        if n == 0:
            raise EdgeftError("pte runtime: empty token sequence")
        if n > self.max_context_len:
            raise EdgeftError(
                f"pte runtime: {n} tokens exceed the program's context of {self.max_context_len} "
                "(export with a larger --max-seq-len)"
            )

    def _step(self, ids: list[int], start: int) -> torch.Tensor:
        """Run ``ids`` at positions ``start..``; returns float32 logits [len(ids), vocab] ([1, vocab], the last
        position, from a last-token program)."""
        tokens = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start, start + len(ids), dtype=torch.long)
        if not self.dynamic:
            pos = pos[:1]
        try:
            out = self._method.execute([tokens, pos])[0]
        except RuntimeError as e:
            raise EdgeftError(f"ExecuTorch failed running {self.path.name}: {e}") from None
        rows = len(ids) if self.full_logits else 1
        if out.dim() not in (2, 3) or out.numel() != rows * out.shape[-1]:
            # e.g. metadata that does not describe the program: never reshape one position into several
            raise EdgeftError(
                f"{self.path.name} returned logits of shape {tuple(out.shape)} for {len(ids)} tokens "
                f"(expected {rows} position{'s' if rows > 1 else ''}; {FULL_LOGITS_METHOD}={self.full_logits})"
            )
        return out.reshape(rows, -1).float()

    def _need_full(self, what: str) -> None:
        if not self.full_logits:
            raise EdgeftError(
                f"{self.path.name} returns last-token logits only (exported with --logits last): {what} needs every "
                "position; use the program `edgeft export pte` writes by default (--logits all, model.pte)"
            )

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        parts = []
        for start in range(0, len(ids), self._chunk):
            parts.append(self._step(ids[start : start + self._chunk], start))
        return torch.cat(parts, 0)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of ``ids`` from a fresh context: float32 [len(ids), vocab]."""
        self._need_full("logits at every position")
        self._check_len(len(ids))
        return self._prefill([int(t) for t in ids])

    @torch.no_grad()
    def continuation_logits(self, prefix: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """For each continuation, the logits predicting its tokens after ``prefix``: float32 [len(c), vocab].

        The prefix runs once; every continuation then runs from position ``len(prefix)``, overwriting the cache
        rows the one before wrote, and attention at ``p`` reads rows ``0..p`` only, so each sees prefix + itself.
        After a continuation that wrote more than ``max_rewind`` positions (a ring-cache program), the prefix runs
        again: the ring has overwritten prefix keys.
        """
        self._need_full("continuation logits")
        prefix = [int(t) for t in prefix]
        self._check_len(len(prefix) + max((len(c) for c in continuations), default=1) - 1)
        last = self._prefill(prefix)[-1:]
        res = []
        written = 0
        for c in continuations:
            if written > self.max_rewind:
                self._prefill(prefix)
            written = len(c) - 1
            rows, tail = [last], [int(t) for t in c[:-1]]
            for start in range(0, len(tail), self._chunk):
                rows.append(self._step(tail[start : start + self._chunk], len(prefix) + start))
            res.append(torch.cat(rows, 0))
        return res

    @torch.no_grad()
    def next_logits(self, ids: list[int]) -> torch.Tensor:
        """Logits predicting the token after ``ids`` (its last position) from a fresh context: float32 [vocab].
        Any program: the prompt runs in chunks of ``get_max_seq_len`` as in ``logits``."""
        self._check_len(len(ids))
        return self._prefill([int(t) for t in ids])[-1]

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation (argmax at each step, stop token excluded), from a fresh context."""
        ids = [int(t) for t in ids]
        self._check_len(len(ids) + max(max_new_tokens - 1, 0))
        last = self._prefill(ids)[-1]
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(torch.argmax(last))
            if tok in stop_ids:
                break
            out.append(tok)
            if len(out) < max_new_tokens:
                last = self._step([tok], len(ids) + len(out) - 1)[-1]
        return out

    def close(self) -> None:
        self._method = None
        self._program = None

    def __enter__(self) -> "PteRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
