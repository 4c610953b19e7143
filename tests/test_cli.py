"""The CLI: bad input gives one clear error line and a non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest

from edgeft.cli import main


@pytest.fixture
def bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "no output"}\n')
    return str(p)


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["train", "--model", "tiny-llama", "--data", "/no/such.jsonl"], "data file not found"),
        (["train", "--model", "tiny-llama", "--qat", "int3"], "unknown QAT scheme 'int3'"),
        (["export", "pte", "--run", "/no/such/run"], "not an edgeft run directory"),
        (["eval", "--run", "/no/such/run"], "not an edgeft run directory"),
    ],
)
def test_errors_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeft: error: ") and expected in err[0], err


def test_bad_row_names_the_line(bad_jsonl, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "tiny-llama", "--data", bad_jsonl]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and "'output'" in err and "\n" not in err
    assert not (tmp_path / "runs").exists()  # nothing written for a failed start


def test_no_runs_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval"]) == 2
    assert "no run found" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgeft", "train", "--model", "tiny-llama", "--qat", "int3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeft: error: unknown QAT scheme")


def test_qat_list_and_models(capsys):
    assert main(["qat", "list"]) == 0
    out = capsys.readouterr().out
    assert "phone-deployment" in out and "int8-int4" in out and "pte" in out
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
