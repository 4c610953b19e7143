"""The ``gguf`` host runtime: a GGUF file run by llama.cpp through llama-cpp-python.

This is how a laptop or a phone app built on llama.cpp (Ollama, LM Studio, llama.rn) runs the model, so the
evaluator and the GGUF exporter's validation both measure the artifact exactly as llama.cpp computes it:
its kernels, its quantized dot products, its KV cache. llama_cpp is imported lazily and kept quiet.

``logits`` always starts from an empty KV cache, so results never depend on what ran before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeft.errors import EdgeftError


class GgufRuntime:
    """A GGUF file on llama.cpp: full-sequence logits and greedy generation."""

    name = "gguf"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_ctx: int = 1024,
        n_threads: int | None = None,
        kv_cache: str = "f16",
        **kwargs: Any,
    ):
        try:
            import llama_cpp
            from llama_cpp import Llama
        except ImportError as e:
            raise EdgeftError("running GGUF needs llama-cpp-python: pip install llama-cpp-python") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeftError(f"GGUF file {self.path} does not exist")
        self.n_ctx = int(n_ctx)
        kv_types = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}
        if kv_cache not in kv_types:
            raise EdgeftError(f"gguf runtime: kv_cache must be one of {', '.join(kv_types)}")
        try:
            # logits_all: llama.cpp keeps every position's logits (the evaluator needs all of them)
            self._llm = Llama(
                model_path=str(self.path),
                n_ctx=self.n_ctx,
                n_batch=min(self.n_ctx, 512),
                n_threads=n_threads,
                logits_all=True,
                type_k=kv_types[kv_cache],
                type_v=kv_types[kv_cache],
                verbose=False,
                **kwargs,
            )
        except (ValueError, RuntimeError) as e:
            raise EdgeftError(f"llama.cpp could not load {self.path.name}: {e}") from None
        self.n_vocab = self._llm.n_vocab()

    def _check_len(self, n: int) -> None:
        if n == 0:
            raise EdgeftError("gguf runtime: empty token sequence")
        if n > self.n_ctx:
            raise EdgeftError(f"gguf runtime: {n} tokens exceed the context of {self.n_ctx} (pass n_ctx=...)")

    def _eval_fresh(self, ids: list[int]) -> None:
        self._check_len(len(ids))
        self._llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        self._llm.eval([int(t) for t in ids])

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of ``ids``: float32 [len(ids), vocab]."""
        self._eval_fresh(ids)
        return torch.from_numpy(np.array(self._llm.scores[: len(ids)], dtype=np.float32, copy=True))

    def continuation_logits(self, prefix: list[int], continuations: list[list[int]]) -> list[torch.Tensor]:
        """For each continuation, the logits predicting its tokens after ``prefix``: float32 [len(c), vocab].

        The prefix is evaluated once; each continuation goes after it with ``n_tokens`` set back to the prefix,
        so llama.cpp drops the previous continuation's cache cells before decoding (``Llama.eval``).
        """
        n = len(prefix)
        self._check_len(n + max((len(c) for c in continuations), default=1) - 1)
        self._eval_fresh(prefix)
        last = np.array(self._llm.scores[n - 1 : n], dtype=np.float32, copy=True)
        res = []
        for c in continuations:
            rows = [last]
            if len(c) > 1:
                self._llm.n_tokens = n
                self._llm.eval([int(t) for t in c[:-1]])
                rows.append(np.array(self._llm.scores[n : n + len(c) - 1], dtype=np.float32, copy=True))
            res.append(torch.from_numpy(np.concatenate(rows, 0)))
        return res

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation (argmax at each step, stop token excluded)."""
        self._check_len(len(ids) + max_new_tokens)
        self._eval_fresh(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
            if tok in stop_ids:
                break
            out.append(tok)
            if len(out) < max_new_tokens:
                self._llm.eval([tok])
        return out

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """llama.cpp's own tokenization (``special``: parse control tokens written in the text)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> "GgufRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
