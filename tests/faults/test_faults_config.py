"""Fault injection, configuration: a wrongly typed YAML value, an out-of-range flag or a contradictory pair is one
error line naming the key, exit 2, before anything is written."""

from __future__ import annotations

import pytest
from faultkit import TRAIN, assert_one_error

YAML_CASES = {
    "max-steps-word": ("max_steps: two\n", ["cfg.yaml: max_steps must be a whole number, not 'two'"]),
    "lr-word": ("lr: fast\n", ["lr must be a number or null, not 'fast'"]),
    "bool-as-number": ("packing: 3\n", ["packing must be true or false, not 3"]),
    "float-for-int": ("batch_size: 2.5\n", ["batch_size must be a whole number, not 2.5"]),
    "list-of-numbers": ("qat_int8: [1, 2]\n", ["qat_int8 must be a list of strings, not [1, 2]"]),
    "lora-r-word": ("lora:\n  r: sixteen\n", ["lora.r must be a whole number, not 'sixteen'"]),
    "lora-not-mapping": ("lora: 16\n", ["config key 'lora' must be a mapping"]),
    "unknown-key": ("max_stepz: 2\n", ["unknown config keys: max_stepz"]),
    "invalid-yaml": ("max_steps: [1,\n", ["cfg.yaml: invalid YAML"]),
    "not-a-mapping": ("- 1\n- 2\n", ["expected a mapping of config keys"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_yaml_is_one_line(case, tmp_path, capsys, monkeypatch, data_file):
    text, expected = YAML_CASES[case]
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    assert_one_error(
        [*TRAIN, "--config", str(cfg), "--data", str(data_file), "--out", str(tmp_path / "run")],
        capsys,
        expected,
        keep=[cfg, data_file],
    )
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_error([*TRAIN, "--config", str(tmp_path / "none.yaml")], capsys, "config file not found")


FLAG_CASES = {
    "eval-split-1.5": (["--eval-split", "1.5"], "eval_split must be a share below 1 or a whole count"),
    "eval-split-negative": (["--eval-split", "-0.1"], "eval_split must be a share below 1"),
    "eval-split-all": (["--eval-split", "24"], "leaves no training examples out of 24"),
    "lr-negative": (["--lr", "-1"], "lr must be positive, not -1.0"),
    "lr-zero": (["--lr", "0"], "lr must be positive"),
    "qat-lr-negative": (["--qat", "int8-int4", "--qat-lr", "-1"], "qat_lr must be positive"),
    "max-steps-zero": (["--max-steps", "0"], "max_steps must be at least 1"),
    "batch-size-zero": (["--batch-size", "0"], "batch_size must be at least 1"),
    "warmup-ratio": (["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1)"),
    "resume-and-overwrite": (["--resume", "--overwrite"], "pass one of them"),
    "qat-unknown": (["--qat", "int3"], "unknown QAT scheme 'int3'"),
    "qat-int8-without-qat": (["--qat-int8", "gate_proj"], "--qat-int8 needs --qat"),
    "early-stopping-without-eval": (["--early-stopping-patience", "2"], "needs an evaluation set"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_is_one_line_naming_it(case, tmp_path, capsys, monkeypatch, data_file):
    extra, expected = FLAG_CASES[case]
    monkeypatch.chdir(tmp_path)
    line = assert_one_error(
        [*TRAIN, "--data", str(data_file), "--out", str(tmp_path / "run"), *extra], capsys, expected, keep=[data_file]
    )
    if case == "lr-negative":  # named as the flag the user gave, not the QAT learning rate it defaults
        assert "qat_lr" not in line
    assert not (tmp_path / "run").exists()


PARSER_CASES = {
    "int-flag-word": (["--max-steps", "two"], "argument --max-steps: invalid int value: 'two'"),
    "unknown-flag": (["--max-stepz", "2"], "unrecognized arguments: --max-stepz"),
    "bad-choice": (["--optim", "adam"], "argument --optim: invalid choice: 'adam'"),
}


@pytest.mark.parametrize("case", list(PARSER_CASES))
def test_parser_errors_are_one_line(case, tmp_path, capsys, monkeypatch):
    extra, expected = PARSER_CASES[case]
    monkeypatch.chdir(tmp_path)
    line = assert_one_error([*TRAIN, *extra], capsys, [expected, "--help"])
    assert line.startswith("edgeft")
