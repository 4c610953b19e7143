"""Tabular data to conversations: merge columns into one prompt through a template, extend to multi-turn.

A prompt template names columns in braces and marks optional parts with double brackets::

    "The passenger embarked from {Embarked}.[[ Their age is {Age}.]][[ Their fare is {Fare}.]]"

An optional part is dropped when any column it names is empty (None, NaN or blank), so rows with missing values read
naturally instead of "Their age is ."; a column outside brackets renders as-is. ``{{`` and ``}}`` are literal braces.
The output column becomes the assistant's reply.

``conversation_extension=N`` turns single-turn rows into N-turn conversations: conversation i is row i followed by
N-1 other rows drawn by seeded permutations, so the dataset keeps its size and every row still opens one
conversation (a model fine-tuned only on single turns tends to forget how to continue a chat).

Written here because ``datasets`` has no such merge; it is a few lines of parsing.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from edgeft.errors import EdgeftError

from .formats import Messages, Row, is_empty

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]+)\}")


@dataclass(frozen=True)
class _Part:
    text: str
    optional: bool

    @property
    def columns(self) -> list[str]:
        return [m.group(1).strip() for m in _FIELD.finditer(self.text) if m.group(1)]


def parse_template(template: str) -> list[_Part]:
    """Split a template into plain and ``[[optional]]`` parts; unbalanced brackets are an error."""
    parts: list[_Part] = []
    pos = 0
    while pos < len(template):
        start = template.find("[[", pos)
        close = template.find("]]", pos)
        if close != -1 and (start == -1 or close < start):
            raise EdgeftError(f"prompt template has ']]' without a matching '[[' at character {close}")
        if start == -1:
            parts.append(_Part(template[pos:], False))
            break
        if start > pos:
            parts.append(_Part(template[pos:start], False))
        end = template.find("]]", start + 2)
        nested = template.find("[[", start + 2)
        if end == -1 or (nested != -1 and nested < end):
            raise EdgeftError(f"prompt template has '[[' without a matching ']]' at character {start}")
        parts.append(_Part(template[start + 2 : end], True))
        pos = end + 2
    if not any(p.columns for p in parts):
        raise EdgeftError("prompt template names no column; write columns in braces, e.g. 'Age: {Age}'")
    return parts


def _fill(text: str, row: dict[str, Any]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) == "{{":
            return "{"
        if m.group(0) == "}}":
            return "}"
        v = row.get(m.group(1).strip())
        return "" if is_empty(v) else str(v)

    return _FIELD.sub(sub, text)


def render_row(parts: list[_Part], row: dict[str, Any]) -> str:
    out = []
    for p in parts:
        if p.optional and any(is_empty(row.get(c)) for c in p.columns):
            continue
        out.append(_fill(p.text, row))
    return "".join(out)


def merge_columns(rows: list[Row], template: str, output_column: str | None, source: str) -> list[Messages]:
    """Rows of any table as single-turn conversations: the merged prompt, then the output column."""
    if not rows:
        raise EdgeftError(f"{source}: the dataset is empty")
    if not output_column:
        raise EdgeftError("--prompt-template needs --output-column: the column the model learns to answer with")
    parts = parse_template(template)
    columns = set().union(*(r.keys() for _, r in rows[:100]))
    wanted = sorted({c for p in parts for c in p.columns} | {output_column})
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise EdgeftError(f"{source}: column(s) {missing} not found (columns found: {sorted(columns)})")
    out = []
    for where, row in rows:
        answer = row.get(output_column)
        if is_empty(answer):
            raise EdgeftError(f"{where}: output column {output_column!r} is empty")
        prompt = render_row(parts, row).strip()
        if not prompt:
            raise EdgeftError(f"{where}: the prompt template renders nothing (every part's columns are empty)")
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": str(answer)}])
    return out


def extend_conversations(convs: list[Messages], n: int, seed: int) -> list[Messages]:
    """Each conversation followed by the user/assistant turns of n-1 others (seeded); system prompts from the first."""
    if n <= 1:
        return convs
    if len(convs) < 2:
        raise EdgeftError("conversation_extension needs at least two rows to merge")
    rng = random.Random(seed)
    perms = []
    for _ in range(n - 1):
        p = list(range(len(convs)))
        rng.shuffle(p)
        perms.append(p)
    out = []
    for i, conv in enumerate(convs):
        merged = [dict(m) for m in conv]
        for p in perms:
            merged += [dict(m) for m in convs[p[i]] if m["role"] != "system"]
        out.append(merged)
    return out
