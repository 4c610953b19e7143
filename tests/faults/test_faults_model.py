"""Fault injection, models: a damaged GGUF, a model directory asking for remote code, a model that cannot take the
requested adapters: one error line, exit 2, and a failed start leaves no run directory behind."""

from __future__ import annotations

import json
import shutil

import pytest
from faultkit import TRAIN, assert_one_error

from edgeft.models import resolve_model


@pytest.fixture(scope="module")
def tiny_dir():
    return resolve_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_gguf(exported):
    """A real f16 GGUF of a tiny-llama run (the good file the damaged ones are cut from)."""
    return exported / "exports" / "model-f16.gguf"


def _damaged(kind: str, good, dest):
    raw = good.read_bytes()
    dest.write_bytes(
        {
            "random": bytes(range(256)) * 64,
            "truncated-header": raw[:40],
            "empty": b"",
            "truncated-data": raw[: len(raw) - 4096],
            "bad-magic": b"GGUX" + raw[4:],
        }[kind]
    )
    return dest


@pytest.mark.parametrize("kind", ["random", "truncated-header", "empty", "truncated-data", "bad-magic"])
def test_damaged_gguf_model_is_one_line(kind, tiny_gguf, tmp_path, capsys, monkeypatch, data_file):
    monkeypatch.chdir(tmp_path)
    bad = _damaged(kind, tiny_gguf, tmp_path / f"{kind}.gguf")
    expected = "GGUF file"  # "not a valid GGUF file (...)" or "truncated GGUF file (...)"
    assert_one_error(
        [*TRAIN, "--model", str(bad), "--data", str(data_file), "--out", str(tmp_path / "run")],
        capsys,
        [str(bad), expected],
        keep=[bad],
    )
    assert not (tmp_path / "run").exists()


def test_good_gguf_passes_the_check(tiny_gguf):
    from edgeft.models import check_gguf

    check_gguf(tiny_gguf)  # the check refuses damage, not GGUF files


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_remote_code_model_is_refused(where, tiny_dir, tmp_path, capsys, monkeypatch, data_file):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / where).read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / where).write_text(json.dumps(cfg))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert_one_error(
        [*TRAIN, "--model", str(model), "--data", str(data_file), "--out", str(tmp_path / "run")],
        capsys,
        [where, "remote code (auto_map: AutoModelForCausalLM)"],
        keep=[model],
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["no-config", "config-not-json", "unknown-name"])
def test_model_that_is_not_one(case, tiny_dir, tmp_path, capsys, monkeypatch, data_file):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    if case == "config-not-json":
        (model / "config.json").write_text('{"model_type": "llama",')
    expected = {
        "no-config": "has no config.json",
        "config-not-json": "config.json: not valid JSON",
        "unknown-name": "unknown model 'no-such-model'",
    }[case]
    name = "no-such-model" if case == "unknown-name" else str(model)
    assert_one_error(
        [*TRAIN, "--model", name, "--data", str(data_file), "--out", str(tmp_path / "run")],
        capsys,
        expected,
        keep=[model],
    )
    assert not (tmp_path / "run").exists()


LOAD_CASES = {
    "lora-target-unknown": (["--lora-target-modules", "foo_proj"], "foo_proj"),
    "adapter-missing": (["--adapter", "/no/such/adapter"], "/no/such/adapter"),
    "qat-int8-unknown": (["--qat", "int8-int4", "--no-ptq", "--qat-int8", "foo_proj"], "foo_proj"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_failure_loading_the_model_leaves_no_run(case, tmp_path, capsys, monkeypatch, data_file):
    """A failure before the first step leaves nothing: no directory holding only config.yaml that would refuse a
    plain retry."""
    extra, expected = LOAD_CASES[case]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert_one_error(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(out), *extra],
        capsys,
        expected,
        keep=[data_file],
    )
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


def test_real_process_shows_the_error_alone(tmp_path, data_file):
    """In a terminal the info lines of a start (run directory, data) are held until the model has loaded, so an
    error loading it is the only line."""
    from faultkit import popen

    proc = popen(
        [*TRAIN, "--data", str(data_file), "--out", str(tmp_path / "run"), "--lora-target-modules", "foo_proj"],
        cwd=tmp_path,
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("edgeft: error: LoRA: Target modules"), err
    assert not (tmp_path / "run").exists()
