"""Fault injection, export and eval: a damaged converted model, a bad flag or a missing export is one error line,
exit 2, and the run's artifacts and reports are untouched."""

from __future__ import annotations

import shutil

import pytest
from faultkit import assert_one_error


def _truncate(f, keep=0.5):
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


DAMAGE = {
    "truncated": lambda f: _truncate(f),
    "header-only": lambda f: _truncate(f, 0.001),
    "garbage": lambda f: f.write_bytes(b"\xff" * 4096),
    "empty": lambda f: f.write_bytes(b""),
}


@pytest.mark.parametrize("fmt", ["gguf", "pte"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_converted_model_on_export(fmt, damage, exported_copy, capsys):
    f = exported_copy / "converted" / "model.safetensors"
    DAMAGE[damage](f)
    assert_one_error(
        ["export", fmt, "--run", str(exported_copy)],
        capsys,
        [f"{f} is damaged", "edgeft convert"],
        keep=[exported_copy],
    )


EXPORT_FLAGS = {
    "unknown-quant": (["gguf", "--quant", "q3_x"], "unknown GGUF type 'q3_x'"),
    "quant-on-pte": (["pte", "--quant", "q8_0"], "--quant applies to gguf exports only"),
    "logits-on-gguf": (["gguf", "--logits", "last"], "--logits applies to pte exports only"),
    "unknown-format": (["onnx"], "invalid choice: 'onnx'"),
}


@pytest.mark.parametrize("case", list(EXPORT_FLAGS))
def test_bad_export_flag(case, exported, capsys):
    extra, expected = EXPORT_FLAGS[case]
    assert_one_error(["export", *extra, "--run", str(exported)], capsys, expected, keep=[exported])


def test_export_of_a_run_that_did_not_finish(run_copy, capsys):
    shutil.rmtree(run_copy / "converted")
    assert_one_error(["export", "gguf", "--run", str(run_copy)], capsys, "has no converted model", keep=[run_copy])
    assert not (run_copy / "exports").exists()


def test_export_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert_one_error(["export", "pte", "--run", str(tmp_path)], capsys, "not an edgeft run directory", keep=[tmp_path])


def test_gguf_quant_help_lists_every_type(capsys):
    from edgeft.cli import GGUF_QUANTS
    from edgeft.exporters.gguf import QUANTS

    assert tuple(QUANTS) == GGUF_QUANTS  # the help's list is the exporter's
    from edgeft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "gguf", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(q in out for q in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0")), out


EVAL_CASES = {
    "pte-never-exported": (["--runtimes", "pte"], "has no exported pte: run `edgeft export pte --run"),
    "gguf-never-exported": (["--runtimes", "eager,gguf"], "has no exported gguf: run `edgeft export gguf --run"),
    "unknown-runtime": (["--runtimes", "onnx"], "unknown runtime 'onnx'"),
    "unknown-variant": (["--runtimes", "eager", "--compare", "fp8"], "unknown variant(s) ['fp8']"),
    "missing-variant": (["--runtimes", "eager", "--compare", "qat"], "has no qat variant"),
    "missing-golden": (["--runtimes", "eager", "--check", "/no/golden.json"], "/no/golden.json"),
    "missing-eval-data": (["--runtimes", "eager", "--data", "/no/tasks.jsonl"], "evaluation data file not found"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_bad_eval_is_one_line_and_writes_nothing(case, trained, capsys):
    extra, expected = EVAL_CASES[case]
    assert_one_error(["eval", "--run", str(trained), "--limit", "2", *extra], capsys, expected, keep=[trained])
    assert not (trained / "eval").exists() and not (trained / "exports").exists()


def test_eval_of_a_damaged_converted_model(run_copy, capsys):
    f = run_copy / "converted" / "model.safetensors"
    _truncate(f)
    assert_one_error(
        ["eval", "--run", str(run_copy), "--runtimes", "eager"], capsys, f"{f} is damaged", keep=[run_copy]
    )


def test_eval_of_no_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_error(["eval"], capsys, "no run found under ./runs")


def test_eval_removes_what_a_killed_writer_left(run_copy, capsys):
    """Debris of dead processes (pid above Linux's default pid_max) goes; a live writer's file stays."""
    import os

    dead = 2**22 + 4321
    planted = [
        run_copy / "eval" / f".report.json.tmp-{dead}-x",
        run_copy / "exports" / f".model.pte.tmp-{dead}-y",
        run_copy / "baseline" / "exports" / "float" / f".model-f16.gguf.tmp-{dead}-z",
    ]
    live = run_copy / "exports" / f".model-q8_0.gguf.tmp-{os.getpid()}-w"
    for p in [*planted, live]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    assert_one_error(["eval", "--run", str(run_copy), "--runtimes", "pte"], capsys, "has no exported pte")
    assert not any(p.exists() for p in planted) and live.exists()
