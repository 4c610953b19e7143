"""Fault injection, checkpoints and --resume: a damaged checkpoint file is one error naming it and the checkpoint to
fall back on; following that advice resumes and reproduces the losses; changed data or config is refused; nothing
in the run changes on a refusal."""

from __future__ import annotations

import shutil

import pytest
from faultkit import assert_one_error, rows, run_cli, snapshot


@pytest.fixture
def killed(run_copy):
    """The shared run as if killed after its step-2 checkpoint, before the model was saved."""
    for p in ("model", "converted", "loss.png"):
        target = run_copy / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return run_copy


def _resume(run):
    return ["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"]


DAMAGE = {
    "trainable-truncated": ("trainable.safetensors", lambda b: b[: len(b) // 2]),
    "trainable-garbage": ("trainable.safetensors", lambda b: bytes(len(b))),
    "trainable-appended": ("trainable.safetensors", lambda b: b + b"\0" * 16),
    "optimizer-truncated": ("optimizer.pt", lambda b: b[: len(b) - 100]),
    "scheduler-empty": ("scheduler.pt", lambda b: b""),
    "rng-truncated": ("rng.pt", lambda b: b[:64]),
    "state-json-truncated": ("state.json", lambda b: b[: len(b) // 2]),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_names_the_file_and_the_previous_one(case, killed, capsys, data_file):
    name, damage = DAMAGE[case]
    f = killed / "checkpoints" / "step-2" / name
    f.write_bytes(damage(f.read_bytes()))
    assert_one_error(
        [*_resume(killed), "--data", str(data_file)],
        capsys,
        [f"checkpoint file {f} is damaged", f"remove {f.parent} to resume from step-1"],
        keep=[killed],
    )


def test_only_checkpoint_damaged(killed, capsys, data_file):
    shutil.rmtree(killed / "checkpoints" / "step-1")
    f = killed / "checkpoints" / "step-2" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert_one_error(
        [*_resume(killed), "--data", str(data_file)], capsys, [str(f), "it is the only checkpoint"], keep=[killed]
    )


def test_following_the_advice_resumes_and_reproduces_the_losses(killed, capsys, data_file):
    losses = [r["loss"] for r in rows(killed / "metrics.jsonl")]
    f = killed / "checkpoints" / "step-2" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:10])
    assert run_cli([*_resume(killed), "--data", str(data_file)], capsys)[0] == 2
    shutil.rmtree(f.parent)  # what the error said to do
    rc, err = run_cli([*_resume(killed), "--data", str(data_file)], capsys)
    assert rc == 0, err
    again = rows(killed / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2]
    assert [r["loss"] for r in again] == pytest.approx(losses, abs=1e-6)
    assert (killed / "model" / "edgeft.json").exists()


def test_resume_with_changed_data_is_refused(killed, capsys, data_file, tmp_path):
    """The run records a hash of its examples (data.json): the same file name with other contents is refused."""
    changed = tmp_path / "tasks.jsonl"
    cfg = killed / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(data_file), str(changed)))  # the run trained on this path
    text = data_file.read_text().splitlines()
    changed.write_text("\n".join(text[1:] + text[:1]) + "\n")  # the same rows, reordered
    assert_one_error(
        [*_resume(killed), "--data", str(changed)], capsys, "the data differs from what", keep=[killed, changed]
    )


def test_resume_with_changed_config_is_refused(killed, capsys, data_file):
    assert_one_error(
        [*_resume(killed), "--data", str(data_file), "--lr", "0.5"],
        capsys,
        "different config (lr: 0.0002 -> 0.5)",
        keep=[killed],
    )


def test_resume_of_a_finished_run_changes_nothing(run_copy, capsys, data_file):
    before = snapshot(run_copy)
    rc, err = run_cli([*_resume(run_copy), "--data", str(data_file)], capsys)
    assert rc == 0, err
    assert snapshot(run_copy) == before
