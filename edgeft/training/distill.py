"""Knowledge distillation for QAT: the quantized student learns to reproduce its float twin.

One optimizer step minimises, over the whole accumulation window and all processes,
``(1 − w) · Σ CE / N_targets + w · T² · Σ KL(softmax(t/T) ‖ softmax(s/T)) / N_positions`` (teacher in
``no_grad`` and eval mode; ``positions="all"``: every position whose next token is of the same example,
``"targets"``: the labelled ones only).

Two computations, the same numbers: fused (kernels/fused_linear_kl.py: both heads, the KL, the CE and the
gradient a chunk of rows at a time, no (tokens x vocab) logits; the student's head on the deployed grid; an FSDP
teacher gathered for the kernel) when the student has the fused cross-entropy patch or on CUDA for supported
families with plain bias-free heads; materialised (both models' fp32 logits: the reference and the fallback).
``Distillation.fused`` forces either.

Why distillation, and the details: docs/training.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft.data import IGNORE_INDEX
from edgeft.errors import EdgeftError
from edgeft.kernels.patch import transformers_model

log = logging.getLogger("edgeft")

POSITIONS = ("all", "targets")


def _forward_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's inputs from a batch (use_cache=False, so transformers detects packed rows from position_ids);
    the training loop uses this one too."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    for k in ("attention_mask", "position_ids"):
        if k in batch:
            kw[k] = batch[k]
    return kw


def distill_positions(batch: dict[str, torch.Tensor], which: str = "all") -> torch.Tensor:
    """(B, T-1) mask of the positions whose next-token distributions are distilled.

    ``all``: every position whose next token is in the same example (not padding, not the first token of the
    next example of a flattened or packed row); ``targets``: the positions with a label.
    """
    labels = batch["labels"][:, 1:]
    if which == "targets":
        return labels != IGNORE_INDEX
    valid = torch.ones_like(labels, dtype=torch.bool)
    if "position_ids" in batch:
        valid &= batch["position_ids"][:, 1:] != 0
    if "attention_mask" in batch:
        valid &= batch["attention_mask"][:, 1:].bool()
    return valid


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


def _plain_head(module: nn.Module | None, sharded_ok: bool = False) -> bool:
    """A bias-free Linear head (a QAT-prepared one included) whose weight is a whole local tensor (or, with
    ``sharded_ok``, an FSDP shard that the caller gathers first)."""
    if not isinstance(module, nn.Linear) or module.bias is not None:
        return False
    if type(module) is not nn.Linear and not hasattr(module, "weight_fake_quantizer"):
        return False
    if sharded_ok:
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return True
    return not isinstance(module.weight, DTensor)


def _fused_obstacle(student: nn.Module, teacher: nn.Module) -> str | None:
    """Why the fused path cannot run for this student and teacher (None: it can)."""
    from edgeft.arch import family

    for name, m in (("student", student), ("teacher", teacher)):
        inner = transformers_model(m)
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        if family(model_type) is None:
            return f"the {name}'s architecture {model_type!r} has no kernels"
        # an FSDP teacher's head is gathered for the kernel (unshard); the student's is whole in its root's forward
        sharded_ok = name == "teacher" and _is_fsdp(teacher)
        if not hasattr(inner, "model") or not _plain_head(inner.get_output_embeddings(), sharded_ok):
            return f"the {name}'s LM head is not a plain bias-free Linear"
    if (
        transformers_model(student).get_output_embeddings().weight.shape[0]
        != transformers_model(teacher).get_output_embeddings().weight.shape[0]
    ):
        return "the student's and the teacher's vocabularies differ"
    return None


def student_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1, V) fp32 next-token logits of the (possibly QAT-prepared, kernel-patched) student: the materialised
    path's (and a reference for the fused one)."""
    inner = transformers_model(model)
    kw = _forward_kwargs(batch)
    if getattr(inner, "_edgeft_fused_ce", False):
        from edgeft.kernels.patch import lm_head_operands

        hidden = inner.model(**kw).last_hidden_state[:, :-1]
        shape = hidden.shape[:2]
        h, w = lm_head_operands(inner.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]))
        logits = F.linear(h, w).float()
        cap = getattr(inner.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits.view(*shape, -1)
    return model(**kw).logits[:, :-1].float()


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · Σ_rows KL(softmax(t/T) ‖ softmax(s/T)) over rows of (N, V) logits, in fp32."""
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (lt.exp() * (lt - ls)).sum() * temperature**2


@dataclass
class Distillation:
    """The teacher and the mix; :meth:`losses` gives one micro-batch's summed CE and KL (the loop normalises).

    ``fused``: the fused heads + KL kernel (None: when the student has the fused-CE patch or trains on CUDA, and
    both models allow it; True: always, else an error; False: the materialised logits)."""

    teacher: nn.Module
    weight: float = 1.0
    temperature: float = 1.0
    positions: str = "all"
    fused: bool | None = None
    _said: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise EdgeftError(f"distillation weight must be in [0, 1], not {self.weight}")
        if self.temperature <= 0:
            raise EdgeftError(f"distillation temperature must be positive, not {self.temperature}")
        if self.positions not in POSITIONS:
            raise EdgeftError(f"distillation positions must be one of {POSITIONS}, not {self.positions!r}")
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(distill_positions(batch, self.positions).sum())

    def losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], counts: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy over labelled tokens, summed T²·KL over the distilled positions).

        ``counts``: the whole window's (N_targets, N_positions) that :meth:`objective` will be called with. The
        fused path needs them to compute the objective's gradient in its forward (without them it assumes this
        micro-batch is the window, and a backward through other weights raises); the materialised path ignores them.
        """
        fused = self.use_fused(model)
        if not self._said:  # which path, once: the two differ by tens of GB at large vocabularies
            self._said = True
            log.info("distillation: %s", "fused heads + KL kernel" if fused else "materialised logits")
        if fused:
            return self._fused_losses(model, batch, counts)
        s = student_logits(model, batch)
        with torch.no_grad():
            t = self.teacher(**_forward_kwargs(batch)).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        mask = distill_positions(batch, self.positions)
        return ce, kl_sum(t[mask], s[mask], self.temperature)

    def use_fused(self, model: nn.Module) -> bool:
        """Whether :meth:`losses` takes the fused path for this student (see the module docstring)."""
        if self.fused is False:
            return False
        why = _fused_obstacle(model, self.teacher)
        if self.fused is True:
            if why:
                raise EdgeftError(f"fused distillation is not possible here: {why}")
            return True
        if why:
            return False
        inner = transformers_model(model)
        return bool(getattr(inner, "_edgeft_fused_ce", False)) or inner.get_output_embeddings().weight.is_cuda

    def _fused_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor], counts: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from edgeft.kernels.fused_linear_kl import lm_head_kl_loss
        from edgeft.kernels.patch import head_copy_chunk_rows, lm_head_operands

        inner, t_inner = transformers_model(model), transformers_model(self.teacher)
        kw = _forward_kwargs(batch)
        # PEFT injects its layers into the backbone in place, so calling it directly keeps the adapters
        hidden = inner.model(**kw).last_hidden_state[:, :-1]
        head = inner.get_output_embeddings()
        h, w = lm_head_operands(head, hidden.reshape(-1, hidden.shape[-1]))
        sharded = _is_fsdp(self.teacher)
        with torch.no_grad():
            t_hidden = self._teacher_hidden(t_inner, kw, sharded)[:, :-1]
        th = t_hidden.reshape(-1, t_hidden.shape[-1])
        labels = batch["labels"][:, 1:].reshape(-1)
        mask = distill_positions(batch, self.positions).reshape(-1)
        if counts is None:
            counts = (int((labels != IGNORE_INDEX).sum()), int(mask.sum()))
        # the mix objective() builds from these counts; only its direction matters, so scale it to sum to 1
        a = self.weight / max(counts[1], 1)
        b = (1.0 - self.weight) / max(counts[0], 1) if self.weight < 1.0 else 0.0
        a, b = a / (a + b), b / (a + b)
        rows = head_copy_chunk_rows(head, h, w)  # a fake-quantized head copy comes out of the chunk budget
        if rows is not None:  # that budget was for one logit chunk; the teacher's chunk needs its share
            es, et = h.element_size(), th.element_size()
            rows = max(64, rows * es // (es + et) // 64 * 64)
        if sharded:
            self.teacher.unshard()  # its head whole for the kernel (the gradient is computed in the forward)
        try:
            kl, ce = lm_head_kl_loss(
                h,
                w,
                th,
                t_inner.get_output_embeddings().weight,
                labels,
                mask,
                self.temperature,
                softcap=getattr(inner.config, "final_logit_softcapping", None),
                teacher_softcap=getattr(t_inner.config, "final_logit_softcapping", None),
                kl_weight=a,
                ce_weight=b,
                chunk_rows=rows,
            )
        finally:
            if sharded:
                self.teacher.reshard()
        return ce, kl

    def _teacher_hidden(self, t_inner: nn.Module, kw: dict[str, Any], sharded: bool) -> torch.Tensor:
        """The teacher's final (normed) hidden states. An FSDP-sharded teacher must run through its root's forward
        (which gathers the root's parameters and initialises FSDP's hooks), so its decoder's output is caught by a
        hook and the head computes one position's logits only."""
        if not sharded:
            return t_inner.model(**kw).last_hidden_state
        box: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays as it is
            box["h"] = out.last_hidden_state

        hook = t_inner.model.register_forward_hook(keep)
        try:
            self.teacher(**kw, logits_to_keep=1)
        finally:
            hook.remove()
        return box["h"]

    def objective(self, ce: torch.Tensor, kl: torch.Tensor, n_target: int, n_positions: int) -> torch.Tensor:
        """This micro-batch's share of the window's objective (the counts are the whole window's)."""
        out = kl * (self.weight / max(n_positions, 1))
        if self.weight < 1.0:
            out = out + ce * ((1.0 - self.weight) / max(n_target, 1))
        return out


CORPUS_CHUNK = 128  # tokens per chunk of the packaged prose (fewer when the run's rows are shorter)


def corpus_examples(
    tokenizer: Any, share: float, n_examples: int, chunk: int = CORPUS_CHUNK, seed: int = 0
) -> list[dict[str, list[int]]]:
    """Chunks of edgeft's packaged generic prose (``assets/corpus.txt``, never the held-out text) to mix into a
    QAT run's training data: ``share`` of the mixed examples, at most every chunk the corpus has.

    Fine-tuning data says nothing about most of what the model does; distilled on generic text too, the quantized
    model follows the float one there as well (held-out perplexity). Every token is a target.
    """
    import random
    from importlib import resources

    from edgeft.data import encode_text

    if not 0.0 <= share < 1.0:
        raise EdgeftError(f"the corpus share must be in [0, 1), not {share}")
    if share == 0.0:
        return []
    text = resources.files("edgeft").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    docs = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    chunks = [ex for d in docs for ex in encode_text(tokenizer, d, chunk) if len(ex["input_ids"]) >= chunk // 2]
    random.Random(seed).shuffle(chunks)
    want = round(n_examples * share / (1.0 - share))
    return chunks[:want]


def corpus_count(n_examples: int, share: float) -> int:
    """How many extra examples make ``share`` of a QAT run's ``n_examples`` + extra (:func:`corpus_examples`)."""
    return round(n_examples * share / (1.0 - share)) if share > 0 else 0


PROMPT_TOKENS = 64  # a prompt from the training data: its last tokens before the first labelled one, at most
OPENING_TOKENS = 16  # a prose opening (or a raw-text example's) as a prompt


def generation_prompts(tokenizer: Any, train_ex: list[dict[str, list[int]]], n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts for the twin's generations, alternately from the training examples (the tokens before an
    example's first target, i.e. the conversation up to the answer, at most :data:`PROMPT_TOKENS`; a raw-text
    example's first :data:`OPENING_TOKENS`) and from the packaged prose (a chunk's opening), each list shuffled
    with ``seed``; cycled when ``n`` exceeds them."""
    import random

    data = []
    for ex in train_ex:
        first = next((i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX), len(ex["labels"]))
        ids = ex["input_ids"][max(0, first - PROMPT_TOKENS) : first] if first >= 2 else ex["input_ids"][:OPENING_TOKENS]
        if ids:
            data.append(list(ids))
    prose = [c["input_ids"][:OPENING_TOKENS] for c in corpus_examples(tokenizer, 0.5, 10**9, seed=seed)]
    rng = random.Random(seed)
    rng.shuffle(data)
    rng.shuffle(prose)
    pool = [p for pair in zip(data, prose) for p in pair] + data[len(prose) :] + prose[len(data) :]
    if not pool:
        raise EdgeftError("no prompts for the twin's generations: the training data and the prose are empty")
    return [pool[i % len(pool)] for i in range(n)]


@torch.no_grad()
def generate_continuations(
    model: nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, list[int]]]:
    """The model's continuations of ``prompts`` as training examples (prompt, then at most ``max_new_tokens`` new
    tokens up to and including EOS; the new tokens are the targets). Batched (left-padded), sampled at
    ``temperature`` (0: greedy) from a generator seeded by ``seed`` and the batch's index, so the result depends on
    the seed, not on the global random state (left untouched)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[dict[str, list[int]]] = []
    try:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b : b + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            # the twin's own distribution: no top-k/top-p, no repetition penalty from the model's generation_config
            kw: dict[str, Any] = {"do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
            if temperature > 0:
                kw |= {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": None}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + b)
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                    **kw,
                )
            for p, row in zip(batch, gen[:, width:].tolist()):
                new = row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row
                out.append({"input_ids": p + new, "labels": [IGNORE_INDEX] * len(p) + new})
    finally:
        model.train(was_training)
    return out
