"""The whole pipeline on tiny-llama: LoRA + QAT int8-int4 -> convert -> .pte, GGUF, TorchAO -> eval."""

import json
import math
from pathlib import Path

import pytest

from edgeft.cli import main

GOLDEN = Path(__file__).parent / "golden" / "tiny-llama-lora-int8-int4.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "t"
    rc = main(
        [
            "train",
            "--model",
            "tiny-llama",
            "--data",
            "builtin:tasks",
            "--lora",
            "--qat",
            "int8-int4",
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def test_train_writes_the_run_directory(run):
    for rel in [
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "model/adapter_model.safetensors",
        "model/edgeft.json",
        "converted/scheme.json",
        "converted/model.safetensors",
        "baseline/model/edgeft.json",
        "baseline/converted/scheme.json",
    ]:
        assert (run / rel).exists(), rel
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all({"step", "loss", "lr"} <= set(r) and math.isfinite(r["loss"]) for r in rows)
    assert json.loads((run / "converted" / "scheme.json").read_text())["plan"]["scheme"] == "int8-int4"
    assert json.loads((run / "baseline" / "model" / "edgeft.json").read_text())["qat"] is None


def test_exports_are_written_and_validated(run, capsys):
    assert main(["export", "pte", "--run", str(run)]) == 0
    assert main(["export", "gguf", "--run", str(run), "--quant", "q8_0"]) == 0
    assert main(["export", "torchao", "--run", str(run)]) == 0
    ex = run / "exports"
    assert (ex / "model.pte").stat().st_size > 0 and (ex / "tokenizer.json").exists()
    assert (ex / "model-q8_0.gguf").stat().st_size > 0
    modelfile = (ex / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile or "model-q8_0.gguf" in modelfile.splitlines()[0]
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert (ex / "torchao" / "config.json").exists()
    manifest = json.loads((ex / "manifest.json").read_text())
    assert {"pte", "gguf", "torchao"} <= {v.get("format", k) for k, v in manifest.items()} | set(manifest)


def test_eval_compares_bf16_ptq_qat_on_every_runtime(run, capsys):
    # the golden file is the device regression check users run in CI, applied to our own tiny artifacts
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--limit",
                "4",
                "--ppl-tokens",
                "512",
                "--check",
                str(GOLDEN),
                "--write-golden",
                str(run / "golden.json"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    out = capsys.readouterr().out
    assert "QAT recovered" in out or "n/a" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["eager_device"] == "cpu"  # the default: the host, as .pte and GGUF run
    # every runtime's recoveries carry their paired interval's verdict
    assert set(report["recovery"]) == {"eager", "pte", "gguf"}
    for rec in report["recovery"].values():
        assert set(rec) == {"perplexity", "accuracy", "mc_accuracy"}
        assert all(isinstance(e["resolved"], bool) for e in rec.values())
    got = {(r["variant"], r["runtime"]) for r in report["results"]}
    assert got == {(v, rt) for v in ("bf16", "ptq", "qat") for rt in ("eager", "pte", "gguf")}
    by = {(r["variant"], r["runtime"]): r for r in report["results"]}
    for v in ("bf16", "ptq", "qat"):
        eager = by[(v, "eager")]["perplexity"]
        assert math.isfinite(eager)
        # the .pte runs the same quantized model: its perplexity must agree with eager's closely
        assert by[(v, "pte")]["perplexity"] == pytest.approx(eager, rel=0.02), v
        # and so must its multiple-choice scores (mean log-probability per answer token), question by question
        for rt in ("pte", "gguf"):
            for got, want in zip(by[(v, rt)]["mc_samples"], by[(v, "eager")]["mc_samples"]):
                assert got["scores"] == pytest.approx(want["scores"], abs=0.05), (v, rt)
    assert (run / "eval" / "report.md").read_text().count("|") > 20
    assert (run / "eval" / "metrics.png").stat().st_size > 0


def test_drift_from_golden_fails_one_line_per_metric(run, capsys):
    golden = json.loads(GOLDEN.read_text())
    moved = [m for m in golden["metrics"] if m["metric"] == "perplexity" and m["runtime"] == "pte"]
    for m in moved:
        m["value"] *= 1.5
    drifted = run / "drifted.json"
    drifted.write_text(json.dumps(golden))
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--limit",
                "4",
                "--ppl-tokens",
                "512",
                "--runtimes",
                "eager,pte",
                "--check",
                str(drifted),
                "--no-progress",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "eval:" not in err  # --no-progress: no progress bar in a CI log
    err = err.strip().splitlines()
    drift = [l for l in err if l.startswith("edgeft: drift: ")]
    # the moved pte metrics drift; gguf rows are missing because that runtime was not evaluated
    assert sum("/pte/perplexity" in l and "drifted" in l for l in drift) == len(moved) == 3
    n_gguf = sum(m["runtime"] == "gguf" for m in golden["metrics"])
    assert all("/gguf/" in l for l in drift if "missing" in l) and len(drift) == 3 + n_gguf


def test_eval_on_the_users_own_data(run, tmp_path, capsys):
    (tmp_path / "held.txt").write_text("The harbour was quiet that morning, and the boats stayed in.\n" * 8)
    (tmp_path / "tasks.jsonl").write_text(
        json.dumps({"prompt": "What is 2 + 2? Answer with the result only.", "answer": 4})
        + "\n"
        + json.dumps({"question": "Which is a weekday?", "choices": ["Monday", "blue", "seven"], "answer": "Monday"})
        + "\n"
        + json.dumps({"prompt": "Which is a colour?", "choices": ["Monday", "blue", "seven"], "answer": 1})
        + "\n"
    )
    assert (
        main(
            [
                "eval",
                "--run",
                str(run),
                "--runtimes",
                "eager",
                "--compare",
                "qat",
                "--data",
                str(tmp_path / "held.txt"),
                "--data",
                str(tmp_path / "tasks.jsonl"),
            ]
        )
        == 0
    ), capsys.readouterr().err
    report = json.loads((run / "eval" / "report.json").read_text())
    (row,) = report["results"]
    assert row["n_tasks"] == 1 and row["n_mc"] == 2 and report["mc_chance"] == pytest.approx(1 / 3)
    assert report["eval_data"]["heldout"].endswith("held.txt") and report["eval_data"]["mc"].endswith("tasks.jsonl")
    assert math.isfinite(row["perplexity"]) and 0 <= row["mc_accuracy"] <= 1
    assert "tasks.jsonl" in (run / "eval" / "report.md").read_text()


def test_devices_check_on_the_run(run, capsys):
    assert main(["devices", "check", "--device", "pixel-8", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits on pixel-8") and "tokens/s" in out
    assert main(["devices", "check", "--device", "no-phone", "--run", str(run)]) == 2
    assert "unknown device 'no-phone'" in capsys.readouterr().err


def test_no_partial_files_left(run):
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers
