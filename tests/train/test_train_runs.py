"""Whole `edgeft train` runs with the data/trainer options: the chosen chat template reaches model/, converted/ and the
merged float model; eval split, early stopping and epochs; table data merged into conversations; packing."""

import json
import math

import pytest
import yaml
from transformers import AutoTokenizer

from edgeft.cli import main
from edgeft.models import float_dir


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def titanic(tmp_path_factory):
    d = tmp_path_factory.mktemp("titanic")
    lines = ["Embarked,Age,Fare,Survived"]
    for i in range(40):
        lines.append(
            f"{'SCQ'[i % 3] if i % 5 else ''},{20 + i if i % 4 else ''},{7 + i % 9}.25,{'yes' if i % 2 else 'no'}"
        )
    (d / "titanic.csv").write_text("\n".join(lines) + "\n")
    return d / "titanic.csv"


def test_template_eval_early_stopping_and_merge(titanic, tmp_path):
    run = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "tiny-llama",
        "--data",
        str(titanic),
        "--lora",
        "--chat-template",
        "alpaca",
        "--prompt-template",
        "[[Embarked at {Embarked}.]][[ Age {Age}.]] Fare {Fare}. Survived?",
        "--output-column",
        "Survived",
        "--conversation-extension",
        "2",
        "--system-prompt",
        "Answer yes or no.",
        "--eval-split",
        "0.2",
        "--eval-steps",
        "1",
        "--early-stopping-patience",
        "1",
        "--early-stopping-threshold",
        "100",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--packing",
        "--max-seq-length",
        "256",
        "--out",
        str(run),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # patience 1 with an unbeatable threshold: stop after the 2nd eval
    assert all("eval_loss" in r for r in rows)
    info = json.loads((run / "model" / "edgeft.json").read_text())
    assert info["chat_template"] == {"name": "alpaca", "stop": "<|im_end|>"}
    assert info["train"]["stopped_early"] and info["train"]["best_step"] == 1
    assert info["train"]["batching"] == "packed" and 0 < info["train"]["packing_efficiency"] <= 1
    assert info["examples"] == 32 and info["eval_examples"] == 8
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["max_steps"] == 2 * math.ceil(info["train"]["units"] / 4)  # 2 epochs of packed rows, 4 per step
    assert info["train"]["units"] < 32  # several conversations per packed row
    conv = [{"role": "user", "content": "Age 20. Fare 7.25. Survived?"}]
    for d in (run / "model", run / "converted", float_dir(run)):  # every export reads one of these
        tok = AutoTokenizer.from_pretrained(d)
        assert "### Response:" in tok.chat_template, d
        assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True).endswith(
            "### Instruction:\nAge 20. Fare 7.25. Survived?\n\n### Response:\n"
        )
        assert tok.eos_token == "<|im_end|>"


def test_raw_text_continued_pretraining_run(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(("It was a bright cold day in April, and the clocks were striking thirteen. " * 30 + "\n") * 3)
    run = tmp_path / "cpt"
    assert (
        main(
            [
                "train",
                "--model",
                "tiny-qwen3",
                "--data",
                str(text),
                "--full",
                "--max-seq-length",
                "64",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--out",
                str(run),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # the document packed into full 64-token rows, each continuing the last (its first token repeated as context):
    # 63 new targets a row, every token but the document's first a target once; only the last row is short
    tok = AutoTokenizer.from_pretrained(run / "model")
    n_targets = len(tok(text.read_text())["input_ids"] + [tok.eos_token_id]) - 1
    tail = n_targets % 63 or 63
    assert all(r["target_tokens"] in (63 + 63, 63 + tail) for r in rows)
