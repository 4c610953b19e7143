"""Shared runs of the fault-injection suite, trained once per session and copied by each test that changes one."""

from __future__ import annotations

import json

import pytest
from faultkit import TRAIN, copy_run

from edgeft.cli import main
from edgeft.data import tasks


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """24 builtin:tasks conversations as JSONL (the user's data: tests hash it)."""
    p = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    p.write_text("".join(json.dumps({"messages": tasks.to_messages(r)}) + "\n" for r in tasks.generate("train")[:24]))
    return p


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_file):
    """A finished 2-step LoRA run with checkpoints step-1 and step-2 (read-only: copy it to change it)."""
    run = tmp_path_factory.mktemp("shared") / "run"
    assert main([*TRAIN, "--data", str(data_file), "--max-steps", "2", "--save-steps", "1", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained):
    """The trained run with an f16 GGUF export (read-only)."""
    run = copy_run(trained, tmp_path_factory.mktemp("shared-exported") / "run")
    assert main(["export", "gguf", "--run", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(trained, tmp_path):
    return copy_run(trained, tmp_path / "run")


@pytest.fixture
def exported_copy(exported, tmp_path):
    return copy_run(exported, tmp_path / "run")
