"""Cheap integrity checks of files a stage reads, so a damaged one is one error naming it, not a traceback deep in
a loader: a safetensors file's header must describe exactly the bytes the file holds (truncation, garbage).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import EdgeftError

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when its header matches its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            return f"header length {n} exceeds the file ({size} bytes)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    need = 8 + n + (max(ends) if ends else 0)
    if need != size:
        return f"{size} bytes, its header describes {need}" + (" (truncated)" if need > size else "")
    return None


def check_safetensors_dir(directory: str | os.PathLike, remedy: str) -> None:
    """Every ``*.safetensors`` in ``directory`` complete, else one error naming the first damaged file and
    ``remedy`` (how to re-create it)."""
    for f in sorted(Path(directory).glob("*.safetensors")):
        why = safetensors_problem(f)
        if why:
            raise EdgeftError(f"{f} is damaged ({why}); {remedy}")
