"""Fault injection, kill -9 at seeded random points of train, export and eval (real processes): the old run and its
artifacts stay byte-identical, a killed run resumes to the same losses, and the next command removes the debris."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
from faultkit import TRAIN, debris, popen, rows, run_cli, snapshot

SEED = 18  # the number: the kill points are random, and the same on every run of the suite


def _kill_when(proc, ready, delay: float, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; False if it finished before that."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the process never reached the kill point"
        time.sleep(0.01)
    end = time.time() + delay
    while time.time() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return True


@pytest.mark.parametrize("point", range(2))
def test_kill_during_overwrite_keeps_the_old_run(point, run_copy, data_file, capsys):
    rng = random.Random(SEED * 10 + point)
    before = snapshot(run_copy)
    proc = popen(
        [
            *TRAIN,
            "--data",
            str(data_file),
            "--max-steps",
            "3",
            "--save-steps",
            "1",
            "--out",
            str(run_copy),
            "--overwrite",
        ],
        cwd=run_copy.parent,
    )
    siblings = lambda: [p for p in run_copy.parent.iterdir() if p.name.startswith(".run.tmp-")]  # noqa: E731
    # a seeded point: after 0-2 of the 3 steps (0: while the model loads), then up to 0.3 s more
    steps = rng.randint(0, 2)

    def ready() -> bool:
        if not siblings():
            return False
        m = siblings()[0] / "metrics.jsonl"
        return steps == 0 or (m.exists() and len(m.read_text().splitlines()) >= steps)

    killed = _kill_when(proc, ready, rng.uniform(0.0, 0.3))
    if killed:
        assert snapshot(run_copy) == before, "a killed --overwrite changed the old run"
        assert siblings()  # the new run died half-built beside it
    else:
        assert proc.returncode == 0, proc.stderr.read()
    # the next train into the run removes the dead process's sibling (and here replaces the run)
    rc, err = run_cli(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(run_copy), "--overwrite"], capsys
    )
    assert rc == 0, err
    assert not siblings() and not debris(run_copy)


def test_kill_mid_training_then_resume_reproduces_the_losses(trained, data_file, tmp_path, capsys):
    """Killed at a seeded point of a fresh run (the shared run's settings), --resume ends where it would have."""
    rng = random.Random(SEED)
    run = tmp_path / "run"
    proc = popen(
        [*TRAIN, "--data", str(data_file), "--max-steps", "2", "--save-steps", "1", "--out", str(run)], cwd=tmp_path
    )
    metrics = run / "metrics.jsonl"
    killed = _kill_when(proc, lambda: metrics.exists() and metrics.stat().st_size > 0, rng.uniform(0.0, 0.3))
    if killed:
        assert not (run / "model" / "edgeft.json").exists() or (run / "converted").exists()
        rc, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"], capsys)
        assert rc == 0, err
    else:
        assert proc.returncode == 0, proc.stderr.read()
    want, got = rows(trained / "metrics.jsonl"), rows(metrics)
    assert [r["step"] for r in got] == [1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    assert (run / "converted" / "scheme.json").exists() and not debris(run)


def test_kill_during_export_keeps_the_old_artifact(exported_copy, capsys):
    rng = random.Random(SEED + 1)
    ex = exported_copy / "exports"
    before = snapshot(ex)
    proc = popen(["export", "gguf", "--quant", "f16", "--run", str(exported_copy)], cwd=exported_copy.parent)
    # while the file is written or validated on llama.cpp (seconds on tiny-llama)
    killed = _kill_when(proc, lambda: any(".tmp-" in p.name for p in ex.iterdir()), rng.uniform(0.0, 0.5))
    if killed:
        assert {k: v for k, v in snapshot(ex).items() if ".tmp-" not in k} == before
    else:
        assert proc.returncode == 0, proc.stderr.read()
        json.loads((ex / "manifest.json").read_text())
    # the next export, whatever it does, first removes what the killed one left (a bad --quant fails fast after it)
    rc, err = run_cli(["export", "gguf", "--quant", "q3_x", "--run", str(exported_copy)], capsys)
    assert rc == 2 and len(err) == 1
    assert not debris(ex) and (ex / "model-f16.gguf").exists()


def test_kill_during_eval_keeps_the_old_report(trained, tmp_path, capsys):
    from faultkit import copy_run

    run = copy_run(trained, tmp_path / "run")
    args = ["eval", "--run", str(run), "--runtimes", "eager", "--limit", "2", "--ppl-tokens", "64"]
    rc, err = run_cli(args, capsys)
    assert rc == 0, err
    ev = run / "eval"
    before = snapshot(ev)
    rng = random.Random(SEED + 2)
    log = tmp_path / "stderr.txt"
    proc = popen(args, cwd=tmp_path, stderr=log)
    # once its progress bar shows (the model is loaded and evaluating), a seeded moment later
    killed = _kill_when(proc, lambda: "eval" in log.read_text(), rng.uniform(0.0, 1.0))
    after = snapshot(ev)
    for name in ("report.json", "report.md", "questions.jsonl"):
        f = str(ev / name)
        if after.get(f) != before.get(f):  # replaced: only by a complete new file
            assert (ev / name).read_text().strip()
            if name == "report.json":
                json.loads((ev / name).read_text())
    if killed:
        assert set(after) <= set(before) | {k for k in after if ".tmp-" in k}
