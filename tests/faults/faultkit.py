"""Helpers of the fault-injection suite: run the CLI, check the one-line error, prove nothing the user had changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgeft.cli import main

REPO = Path(__file__).resolve().parents[2]
# tiny-llama, one thread, no progress bar: every training command of the suite costs a second or two
TRAIN = [
    "train",
    "--model",
    "tiny-llama",
    "--lora",
    "--batch-size",
    "2",
    "--max-seq-length",
    "128",
    "--threads",
    "1",
    "--no-progress",
]


def snapshot(*roots: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``roots`` (or of the file itself), by path: equal snapshots, nothing lost."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``edgeft argv`` in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_one_error(argv: list[str], capsys, expected: str | list[str], code: int = 2, keep=()) -> str:
    """The command exits ``code`` with exactly one stderr line holding ``expected`` (each of a list), no traceback,
    and every file under ``keep`` is byte-identical afterwards. Returns the line."""
    before = snapshot(*keep)
    rc, err = run_cli(argv, capsys)
    assert rc == code, (rc, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and ": error: " in err[0], err
    for e in [expected] if isinstance(expected, str) else expected:
        assert e in err[0], (e, err[0])
    assert snapshot(*keep) == before
    return err[0]


def env(**extra: str) -> dict[str, str]:
    e = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    e.setdefault("EDGEFT_CACHE", str(REPO / ".cache" / "edgeft"))
    e.update(extra)
    return e


def popen(argv: list[str], cwd: str | os.PathLike, stderr: Path | None = None, **kw) -> subprocess.Popen:
    """``python -m edgeft argv`` as a real process (for kill -9 and for what the user's terminal shows); ``stderr``:
    a file to write it to (watchable while it runs), else a pipe."""
    err = open(stderr, "w") if stderr is not None else subprocess.PIPE
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "edgeft", *argv],
            cwd=cwd,
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            **kw,
        )
    finally:
        if stderr is not None:
            err.close()


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def debris(root: Path) -> list[Path]:
    """Temporary files and directories of atomic writes (what a killed or failed writer could leave)."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
