"""What every plan shares: the ``train`` callback's shape (one training run into a variant of the run directory) and
the QAT run's data (the user's examples mixed with generic prose and/or the twin's own generations). The plans import
this module, never the package, so the package may import the plans without an import cycle."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from edgeft.rundir import RunDir, Variant

log = logging.getLogger("edgeft")

GENERATION_BATCH = 64  # prompts per generate call: a handful of calls for a run's few hundred examples


class TrainRun(Protocol):
    """One training run into ``root`` on ``data``, with fake quantization or not; ``twin``: the trained float twin
    it learns from (starts at and/or distils from, as the config's ``qat`` section says)."""

    def __call__(self, root: Variant, data: tuple, qat: bool, twin: Variant | None = None) -> None: ...


def corpus_split(cfg: Any, n_examples: int) -> tuple[int, int]:
    """(prose chunks, twin generations) the QAT run mixes into ``n_examples`` (``qat.corpus`` of the mixed
    examples; ``qat.corpus_source``: all prose, all generations, or half each, the odd one a generation)."""
    from edgeft.training.distill import corpus_count

    q = cfg.qat
    n = corpus_count(n_examples, q.corpus) if (q.scheme and q.corpus) else 0
    gen = {"generations": n, "mixed": n - n // 2}.get(q.corpus_source or "prose", 0)
    return n - gen, gen


def with_prose(
    cfg: Any, data: tuple, is_main: bool = True, twin: Variant | None = None, run: RunDir | None = None
) -> tuple:
    """The QAT run's data: the training examples mixed with ``cfg.qat.corpus`` of packaged generic prose and/or
    the trained ``twin``'s own generations (``cfg.qat.corpus_source``; saved in ``run``), so the quantized model
    follows the float one beyond the user's data (training/distill.py)."""
    if not (cfg.qat.scheme and cfg.qat.corpus):
        return data
    from edgeft.training.distill import CORPUS_CHUNK, corpus_examples

    tokenizer, template, train_ex, eval_ex = data
    n_prose, n_gen = corpus_split(cfg, len(train_ex))
    # no mixed-in example may be longer than a training row (packing's bins hold max_seq_length tokens)
    cap = cfg.data.max_seq_length
    chunk = min(CORPUS_CHUNK, cap)
    prose = corpus_examples(tokenizer, cfg.qat.corpus, len(train_ex), chunk=chunk, seed=cfg.optim.seed)[:n_prose]
    gens = twin_generations(cfg, run, twin, tokenizer, train_ex, n_gen, is_main) if n_gen else []
    gens = [{k: v[:cap] for k, v in g.items()} for g in gens]
    if is_main:
        log.info(
            "QAT data: %d examples + %d chunks of generic prose + %d twin generations (--qat-corpus %.2f, %s)",
            len(train_ex),
            len(prose),
            len(gens),
            cfg.qat.corpus,
            cfg.qat.corpus_source or "prose",
        )
    return (tokenizer, template, train_ex + prose + gens, eval_ex)


def _generation_record(cfg: Any, n: int) -> dict[str, Any]:
    q = cfg.qat
    return {"count": n, "seed": cfg.optim.seed, "max_new_tokens": q.gen_tokens, "temperature": q.gen_temperature}


def twin_generations(
    cfg: Any, run: RunDir | None, twin: Variant | None, tokenizer: Any, train_ex: list, n: int, is_main: bool = True
) -> list[dict[str, list[int]]]:
    """``n`` continuations sampled from the trained float ``twin`` (prompts from the training data and the prose
    openings; ``qat.gen_tokens`` new tokens at most, at ``qat.gen_temperature``, seeded by ``optim.seed``), made once
    on the main process and written atomically to ``run.generations``; a resumed run (and every other process)
    reads them from there."""
    from edgeft.errors import EdgeftError
    from edgeft.fsutil import write_text

    if twin is None or run is None:
        raise EdgeftError("the twin's generations need the trained twin and the run directory")
    want = _generation_record(cfg, n)
    path = run.generations
    saved = json.loads(path.read_text()) if path.exists() else None
    if is_main and (saved is None or saved.get("record") != want):
        examples = _generate(cfg, twin, tokenizer, train_ex, n)
        write_text(path, json.dumps({"record": want, "twin": str(twin.root), "examples": examples}) + "\n")
        log.info("QAT data: %d generations of the twin written to %s", n, path)
    _wait_for_main()
    saved = json.loads(path.read_text())
    if saved.get("record") != want:
        raise EdgeftError(f"{path} holds other generations ({saved.get('record')}, not {want})")
    return saved["examples"]


def _generate(cfg: Any, twin: Variant, tokenizer: Any, train_ex: list, n: int) -> list[dict[str, list[int]]]:
    """Load the trained twin in the run's dtype on its device and generate (training/distill.py)."""
    import torch

    from edgeft.models import load_trained
    from edgeft.training.distill import generate_continuations, generation_prompts

    model, _ = load_trained(twin.root)
    device = torch.device(cfg.hardware.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device=device, dtype=torch.bfloat16 if cfg.hardware.dtype == "bf16" else torch.float32)
    prompts = generation_prompts(tokenizer, train_ex, n, seed=cfg.optim.seed)
    out = generate_continuations(
        model,
        prompts,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        cfg.qat.gen_tokens,
        cfg.qat.gen_temperature,
        seed=cfg.optim.seed,
        batch_size=GENERATION_BATCH,
    )
    del model
    return out


def _wait_for_main() -> None:
    """Under torchrun: the other processes wait until the main one has written the generations."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
