"""The CLI: bad input gives one clear error line and a non-zero exit, no traceback."""

import json
import subprocess
import sys

import pytest
import torch

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
        (["eval", "--run", "/no/such/run", "--device", "tpu:x"], "is not a torch device"),
        (["eval", "--run", "/no/such/run", "--device", "mps"], "the evaluator runs on cpu or cuda"),
    ],
)
def test_errors_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeft: error: ") and expected in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_eval_on_a_missing_gpu_is_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--run", "/no/such/run", "--device", "cuda"]) == 2  # the device is checked first
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgeft: error: --device cuda: this machine has no CUDA GPU that torch can use"]


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
    proc = subprocess.run(
        [sys.executable, "-m", "edgeft", "train", "--model", "tiny-llama", "--qat", "int3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeft: error: unknown QAT scheme")


def test_qat_list_and_models(capsys):
    assert main(["qat", "list"]) == 0
    out = capsys.readouterr().out
    assert "phone-deployment" in out and "int8-int4" in out and "pte" in out
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


@pytest.fixture
def tiny_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n" for i in range(8)))
    return str(p)


@pytest.mark.parametrize(
    "extra,expected",
    [
        (
            ["--model", "tiny-qwen3", "--chat-template", "llama-3"],
            "chat template 'llama-3' does not fit the tokenizer of tiny-qwen3: '<|start_header_id|>' is not one of",
        ),
        (["--chat-template", "llama-2"], "unknown chat template 'llama-2'"),
        (["--max-seq-length", "8"], "every example is longer than max_seq_length=8 tokens"),
        (
            ["--prompt-template", "Do {instructon}", "--output-column", "output"],
            "column(s) ['instructon'] not found (columns found: ['instruction', 'output'])",
        ),
        (["--report-to", "mlflow"], "unknown --report-to 'mlflow'"),
        (["--qat", "int8-int4", "--load-in-4bit"], "--qat needs a float base"),
        (["--full", "--load-in-4bit"], "cannot do full fine-tuning"),
        (["--early-stopping-patience", "2"], "early stopping needs an evaluation set"),
        (["--resume"], "holds no run to resume"),
    ],
)
def test_bad_train_input_is_one_line_and_writes_nothing(extra, expected, tiny_data, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny-llama", "--data", tiny_data, "--out", str(out), "--no-progress", *extra]
    if "--model" in extra:
        argv = ["train", "--data", tiny_data, "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeft: error: ") and expected in err[0], err
    assert not out.exists()


def test_existing_run_is_never_clobbered(tiny_data, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: tiny-llama\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    argv = [
        "train",
        "--model",
        "tiny-llama",
        "--data",
        tiny_data,
        "--out",
        str(out),
        "--no-progress",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (out / "model" / "edgeft.json").exists()
