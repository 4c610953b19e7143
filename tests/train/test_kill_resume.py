"""A real `python -m edgeft train` killed with SIGKILL mid-run resumes as if it had never been interrupted."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from edgeft.cli import main
from edgeft.data import tasks

ARGS = [
    "train",
    "--model",
    "tiny-llama",
    "--lora",
    "--max-steps",
    "10",
    "--batch-size",
    "8",
    "--grad-accum",
    "2",
    "--lr",
    "1e-3",
    "--save-steps",
    "2",
    "--save-total-limit",
    "2",
    "--eval-split",
    "16",
    "--eval-steps",
    "3",
    "--threads",
    "1",
    "--no-progress",
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigkill_then_resume_matches_a_run_never_killed(tmp_path, capsys):
    ref, run, data = tmp_path / "ref", tmp_path / "run", tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": tasks.to_messages(r)}) + "\n" for r in tasks.generate("train")[:300])
    )
    args = [*ARGS, "--data", str(data)]
    assert main([*args, "--out", str(ref)]) == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgeft", *args, "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:  # past the step-2 and step-4 checkpoints
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (run / "model").exists()  # it really died mid-training
    killed_at = len(_rows(metrics))
    assert 5 <= killed_at < 10
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert 1 <= len(ckpts) <= 2 + 1  # the newest two, plus the best (eval) checkpoint

    # a resume with another configuration is refused, and changes nothing on disk
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config (lr: 0.001 -> 0.5)" in err[0], err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    a, b = _rows(ref / "metrics.jsonl"), _rows(metrics)
    assert [r["step"] for r in b] == list(range(1, 11))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
        assert y["lr"] == pytest.approx(x["lr"], abs=1e-12)
        assert ("eval_loss" in x) == ("eval_loss" in y)
        if "eval_loss" in x:
            assert y["eval_loss"] == pytest.approx(x["eval_loss"], abs=1e-6)
    wa = load_file(str(ref / "model" / "adapter_model.safetensors"))
    wb = load_file(str(run / "model" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(float((wa[k] - wb[k]).abs().max()) < 1e-6 for k in wa)
    assert (run / "converted" / "scheme.json").exists()
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    # resuming a finished run does nothing and keeps it
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert len(_rows(metrics)) == 10
