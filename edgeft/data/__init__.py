"""Data: dataset sources, row formats, chat templates, tokenisation with loss masking, batching.

``load_records(source, ...)`` gives conversations (lists of role/content messages) or raw-text documents from
``builtin:tasks``, a file, a ``datasets.Dataset`` or a hub name; ``apply_template`` installs a chat template on the
tokenizer; ``encode_dataset`` gives token ids with assistant-only labels; ``Batcher`` makes padded, padding-free or
packed micro-batches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

from . import facts, tasks
from .batching import BATCHING, Batcher, collate, collate_flat, pack, packing_efficiency, padding_efficiency, sequences
from .encode import (
    IGNORE_INDEX,
    assistant_spans,
    conversation_spans,
    document_ids,
    encode_conversation,
    encode_conversation_examples,
    encode_dataset,
    encode_prompt,
    encode_text,
    pack_documents,
)
from .formats import (
    Messages,
    detect_format,
    looks_like_hub_name,
    read_rows,
    records_from_rows,
    rows_from_dataset,
    rows_from_hub,
    standardize_sharegpt,
)
from .merge import extend_conversations, merge_columns
from .templates import TEMPLATES, apply_template, describe_templates, get_template

BUILTIN_DATASETS = {
    "builtin:tasks": "arithmetic, calendar and unit-conversion questions with exact answers",
    "builtin:facts": "element, country, currency and language code questions (a second task set)",
}
_BUILTIN_MODULES = {"builtin:tasks": tasks, "builtin:facts": facts}


def _rows(source: Any, split: str) -> tuple[list, str]:
    if not isinstance(source, (str, Path)):
        return rows_from_dataset(source, type(source).__name__), type(source).__name__
    spec = str(source)
    path = Path(spec).expanduser()
    if not path.exists() and looks_like_hub_name(spec):
        return rows_from_hub(spec, split), spec
    return read_rows(path), spec


def load_records(
    source: Any,
    split: str = "train",
    *,
    prompt_template: str | None = None,
    output_column: str | None = None,
    conversation_extension: int = 1,
    system_prompt: str | None = None,
    seed: int = 42,
) -> list[Messages | str]:
    """Conversations or raw-text documents from ``builtin:tasks``, a file, a dataset object or a hub name.

    ``prompt_template``/``output_column`` merge a table's columns into one prompt (see :mod:`.merge`);
    ``conversation_extension`` merges that many rows into one multi-turn conversation; ``system_prompt`` is added to
    conversations that have none.
    """
    if isinstance(source, str) and source.startswith("builtin:"):
        if source not in _BUILTIN_MODULES:
            raise EdgeftError(f"unknown built-in dataset {source!r}; built-ins: {', '.join(BUILTIN_DATASETS)}")
        records: list = [tasks.to_messages(r) for r in _BUILTIN_MODULES[source].generate(split)]
    else:
        rows, name = _rows(source, split)
        if prompt_template:
            records = merge_columns(rows, prompt_template, output_column, name)
        else:
            if output_column:
                raise EdgeftError("--output-column applies with --prompt-template only")
            records = records_from_rows(rows, name)
    if conversation_extension > 1:
        if any(isinstance(r, str) for r in records):
            raise EdgeftError("conversation_extension applies to conversations, not raw text")
        records = extend_conversations(records, conversation_extension, seed)
    if system_prompt:
        records = [
            r if isinstance(r, str) or r[0]["role"] == "system" else [{"role": "system", "content": system_prompt}, *r]
            for r in records
        ]
    return records


def conversation_rows(
    records: list, source: Any, split: str = "train", prompt_template: str | None = None
) -> str | None:
    """Which rows are conversations (they need a chat template), named for an error message: their count, format
    and first row; None when every row is raw text (which needs no template). Reads the source's format again:
    call it on the error path only."""
    idx = [i for i, r in enumerate(records) if not isinstance(r, str)]
    if not idx:
        return None
    if prompt_template:
        fmt, name = "--prompt-template", str(source)
    elif isinstance(source, str) and source.startswith("builtin:"):
        fmt, name = "chat", source
    else:
        rows, name = _rows(source, split)
        fmt = detect_format(rows, name)[0]
    first = json.dumps(records[idx[0]], ensure_ascii=False)
    return (
        f"{len(idx)} of {len(records)} rows of {name} are conversations ({fmt} format; the first, row "
        f"{idx[0] + 1}: {first[:100]}{'...' if len(first) > 100 else ''})"
    )


def load_conversations(spec: str, split: str = "train") -> list[Messages]:
    """Conversations from ``builtin:tasks`` (train/test split) or a data file (raw text is rejected)."""
    records = load_records(spec, split)
    if any(isinstance(r, str) for r in records):
        raise EdgeftError(f"{spec}: holds raw text, not conversations")
    return records


def split_train_eval(examples: list, eval_split: float, seed: int) -> tuple[list, list]:
    """A seeded shuffled split: ``eval_split`` < 1 is a fraction, >= 1 a count of held-out examples."""
    if eval_split <= 0:
        return examples, []
    n_eval = int(round(eval_split * len(examples))) if eval_split < 1 else int(eval_split)
    n_eval = max(1, n_eval)
    if n_eval >= len(examples):
        raise EdgeftError(f"eval_split={eval_split} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in order[:n_eval]]


__all__ = [
    "BATCHING",
    "BUILTIN_DATASETS",
    "Batcher",
    "IGNORE_INDEX",
    "Messages",
    "TEMPLATES",
    "apply_template",
    "assistant_spans",
    "collate",
    "collate_flat",
    "conversation_rows",
    "conversation_spans",
    "describe_templates",
    "document_ids",
    "encode_conversation",
    "encode_conversation_examples",
    "encode_dataset",
    "encode_prompt",
    "encode_text",
    "extend_conversations",
    "get_template",
    "load_conversations",
    "load_records",
    "merge_columns",
    "pack",
    "pack_documents",
    "packing_efficiency",
    "padding_efficiency",
    "sequences",
    "split_train_eval",
    "standardize_sharegpt",
    "facts",
    "tasks",
]
