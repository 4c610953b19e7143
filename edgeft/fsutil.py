"""Atomic writes: every file and directory appears complete or not at all (docs/design.md: the run directory)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# temporary names carry the writer's pid: remove_stale can tell a killed writer's debris from a live one's work
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Remove the temporary files and directories (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) that a killed writer left
    in ``directory``, those whose name starts with ``prefix`` and whose process is gone; returns what was removed."""
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _STALE.match(p.name)
        if not m or not p.name.startswith(prefix) or _alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``dest``, on failure remove it.

    An existing ``dest`` is replaced only after the new one is complete, so a failed stage never
    destroys a good earlier result.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; results are meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(dest)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            # another process completed ``dest`` meanwhile (two filling one cache): keep the complete one it wrote
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest``; rename it over ``dest`` only on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(dest), dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``dest`` atomically."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def cache_dir() -> Path:
    """edgeft's cache: $EDGEFT_CACHE, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft."""
    env = os.environ.get("EDGEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeft"
