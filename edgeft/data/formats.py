"""Dataset files and their row formats, standardised to chat messages.

Inputs: JSONL and CSV files (and ``builtin:tasks``). Row formats: alpaca (``instruction``, optional
``input``, ``output``) and messages (``messages``: a list of ``{"role", "content"}``). Every problem in a
file is reported as one line naming the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

Messages = list[dict[str, str]]
_ROLES = {"system", "user", "assistant"}


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a .jsonl/.json/.csv file as (line number or index, dict) pairs."""
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgeftError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EdgeftError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((i, row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EdgeftError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise EdgeftError(f"{path}: expected a JSON list of objects")
        return list(enumerate(data, 1))
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [(i, dict(r)) for i, r in enumerate(csv.DictReader(f), 2)]  # line 1 is the header
    raise EdgeftError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .csv)")


def detect_format(rows: list[dict[str, Any]], source: str) -> str:
    if not rows:
        raise EdgeftError(f"{source}: the dataset is empty")
    cols = set(rows[0])
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    raise EdgeftError(
        f"{source}: cannot tell the format from columns {sorted(cols)}; expected 'messages' "
        "(role/content list) or alpaca 'instruction', 'output' (and optional 'input')"
    )


def to_messages(row: dict[str, Any], fmt: str, where: str) -> Messages:
    """One row in the given format as a list of chat messages."""
    if fmt == "alpaca":
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str) or row.get(k) == ""]
        if missing:
            raise EdgeftError(f"{where}: alpaca row is missing {missing} (columns found: {sorted(row)})")
        prompt = row["instruction"]
        extra = row.get("input") or ""
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt == "messages":
        msgs = row.get("messages")
        if isinstance(msgs, str):  # CSV cells hold JSON text
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise EdgeftError(f"{where}: 'messages' is not a JSON list") from None
        if not isinstance(msgs, list) or not msgs:
            raise EdgeftError(f"{where}: 'messages' must be a non-empty list (columns found: {sorted(row)})")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EdgeftError(f"{where}: message {j} needs string 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise EdgeftError(f"{where}: message {j} has role {m['role']!r}; expected one of {sorted(_ROLES)}")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise EdgeftError(f"{where}: the conversation has no assistant message to learn from")
        return out
    raise EdgeftError(f"unknown data format {fmt!r}")


def load_file(path: str | Path) -> list[Messages]:
    """A JSONL/JSON/CSV dataset as conversations."""
    rows = read_rows(path)
    fmt = detect_format([r for _, r in rows], str(path))
    return [to_messages(r, fmt, f"{path}:{i}") for i, r in rows]
