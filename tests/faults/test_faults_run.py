"""Fault injection, the run directory: an existing run is replaced only by a complete new one (--overwrite trains
beside it and swaps at the end), never without --overwrite; a failed start leaves nothing that blocks a retry."""

from __future__ import annotations

import os

import pytest
from faultkit import TRAIN, assert_one_error, debris, run_cli, snapshot

FAILING = {  # each fails after the run directory was prepared, while the model loads
    "lora-target-unknown": ["--lora-target-modules", "foo_proj"],
    "adapter-missing": ["--adapter", "/no/such/adapter"],
    "qat-int8-unknown": ["--qat", "int8-int4", "--no-ptq", "--qat-int8", "foo_proj"],
}


@pytest.mark.parametrize("case", list(FAILING))
def test_failed_overwrite_keeps_the_old_run(case, run_copy, capsys, data_file):
    before = snapshot(run_copy)
    assert_one_error(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(run_copy), "--overwrite", *FAILING[case]],
        capsys,
        FAILING[case][-1],
        keep=[run_copy, data_file],
    )
    assert snapshot(run_copy) == before
    assert not [p for p in run_copy.parent.iterdir() if p.name.startswith(".run.")]  # no temporary sibling left


def test_overwrite_replaces_the_run_only_when_done(run_copy, capsys, data_file):
    old = (run_copy / "metrics.jsonl").read_text()
    rc, err = run_cli(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--lr", "1e-3", "--out", str(run_copy), "--overwrite"],
        capsys,
    )
    assert rc == 0, err
    new = (run_copy / "metrics.jsonl").read_text()
    assert new != old and len(new.splitlines()) == 1
    assert (run_copy / "model" / "edgeft.json").exists() and (run_copy / "converted" / "scheme.json").exists()
    assert "lr: 0.001" in (run_copy / "config.yaml").read_text()
    # paths recorded while training (the twin, the adapter) name the run, not the temporary directory it was built in
    assert ".tmp-" not in (run_copy / "model" / "edgeft.json").read_text()
    assert not [p for p in run_copy.parent.iterdir() if p.name.startswith(".run.")] and not debris(run_copy)


def test_existing_run_is_refused_without_a_flag(run_copy, capsys, data_file):
    assert_one_error(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(run_copy)],
        capsys,
        "already holds a run; pass --resume to continue it or --overwrite",
        keep=[run_copy],
    )


def test_debris_of_a_failed_start_does_not_block_a_retry(tmp_path, capsys, data_file):
    """A run killed before its first step leaves config.yaml alone: a plain retry trains there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: tiny-llama\n")
    rc, err = run_cli([*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(out)], capsys)
    assert rc == 0, err
    assert (out / "model" / "edgeft.json").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stale_overwrite_sibling_is_removed(run_copy, capsys, data_file):
    """The hidden directory of a killed --overwrite (its process gone) goes with the next train into the run."""
    stale = run_copy.parent / f".run.tmp-{2**22 + 12345}-abc"  # above Linux's default pid_max: never alive
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "config.yaml").write_text("model: tiny-llama\n")
    live = run_copy.parent / f".run.tmp-{os.getpid()}-live"  # a live writer's (this process): kept
    live.mkdir()
    assert_one_error(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(run_copy)],
        capsys,
        "already holds a run",
        keep=[run_copy],
    )
    assert not stale.exists() and live.exists()


def test_out_is_a_file(tmp_path, capsys, data_file):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert_one_error(
        [*TRAIN, "--data", str(data_file), "--out", str(f)], capsys, "is a file, not a directory", keep=[f]
    )


def test_out_is_someone_elses_directory(tmp_path, capsys, data_file):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8 meow")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces runs, never other directories
        assert_one_error(
            [*TRAIN, "--data", str(data_file), "--out", str(d), *extra],
            capsys,
            "holds files but no edgeft run",
            keep=[d],
        )


def test_resume_of_nothing(tmp_path, capsys):
    assert_one_error([*TRAIN, "--out", str(tmp_path / "run"), "--resume"], capsys, "holds no run to resume")
    assert not (tmp_path / "run").exists()
