"""Data: dataset sources, chat formats, tokenisation with loss masking, collation.

``load_conversations("builtin:tasks" | path, split)`` gives chat conversations;
``encode_dataset(tokenizer, conversations, max_length)`` gives token ids with assistant-only labels.
"""

from __future__ import annotations

from pathlib import Path

from edgeft.errors import EdgeftError

from . import tasks
from .encode import IGNORE_INDEX, collate, encode_conversation, encode_dataset, encode_prompt
from .formats import Messages, load_file

BUILTIN_DATASETS = {"builtin:tasks": "arithmetic, calendar and unit-conversion questions with exact answers"}


def load_conversations(spec: str, split: str = "train") -> list[Messages]:
    """Conversations from ``builtin:tasks`` (train/test split) or a JSONL/JSON/CSV file."""
    if spec == "builtin:tasks":
        return [tasks.to_messages(r) for r in tasks.generate(split)]
    if spec.startswith("builtin:"):
        raise EdgeftError(f"unknown built-in dataset {spec!r}; built-ins: {', '.join(BUILTIN_DATASETS)}")
    return load_file(Path(spec).expanduser())


__all__ = [
    "BUILTIN_DATASETS", "IGNORE_INDEX", "Messages", "collate", "encode_conversation", "encode_dataset",
    "encode_prompt", "load_conversations", "tasks",
]
