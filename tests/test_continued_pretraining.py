"""Continued pretraining on a base model: a tokenizer without a chat template trains on raw text (a .txt file, a
.jsonl of "text" rows), and the run exports and evaluates; conversations on it are one error naming the rows."""

import json
import math
import shutil

import pytest
from transformers import AutoTokenizer

from edgeft.cli import main
from edgeft.data import encode_dataset, sequences
from edgeft.models import resolve_model

NOTES = [
    "Field notes, day one. The river bends twice before the old mill, where the water slows and the fish gather "
    "in the shade of the alders. " * 6,
    "Day two. Rain from the west since dawn; the path along the bank is mud to the ankle and the mill race runs "
    "high. " * 4,
    "Day three. The heron came back to the shallows below the weir and stood there, unmoving, for an hour. " * 8,
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """tiny-llama as a base model: the same weights and tokenizer, without any chat template."""
    d = tmp_path_factory.mktemp("base") / "tiny-base"
    shutil.copytree(resolve_model("tiny-llama"), d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert not AutoTokenizer.from_pretrained(d).chat_template
    return d


def _data(tmp_path, suffix):
    if suffix == ".txt":  # one document per file
        p = tmp_path / "notes.txt"
        p.write_text("\n\n".join(NOTES))
        return p, ["\n\n".join(NOTES)]
    p = tmp_path / "notes.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in NOTES))
    return p, NOTES


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_base_model_without_chat_template_trains_on_raw_text(base_dir, tmp_path, suffix, capsys):
    data, docs = _data(tmp_path, suffix)
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(base_dir),
            "--data",
            str(data),
            "--full",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--max-seq-length",
            "64",
            "--lr",
            "1e-3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    tok = AutoTokenizer.from_pretrained(base_dir)
    packed = encode_dataset(tok, docs, 64)  # what training saw: full 64-token rows, one short row at the end
    assert all(len(r["input_ids"]) == 64 for r in packed[:-1])
    assert all(0 < r["target_tokens"] <= 2 * 63 for r in rows)  # two rows of at most 63 targets each
    info = json.loads((out / "model" / "edgeft.json").read_text())
    assert info["mode"] == "full" and info["chat_template"] == {"name": None, "stop": tok.eos_token}
    assert info["examples"] == len(packed)
    assert not AutoTokenizer.from_pretrained(out / "model").chat_template  # no template was invented for it


def test_base_model_run_exports_and_evaluates(base_dir, tmp_path, capsys):
    data, _ = _data(tmp_path, ".jsonl")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(base_dir),
                "--data",
                str(data),
                "--full",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--max-seq-length",
                "64",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["export", "gguf", "--run", str(run)]) == 0, capsys.readouterr().err
    ex = run / "exports"
    modelfile = (ex / "Modelfile").read_text().splitlines()
    assert "FROM ./model-f16.gguf" in modelfile and 'TEMPLATE """{{ .Prompt }}"""' in modelfile
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert f"PARAMETER stop {json.dumps(tok.eos_token)}" in modelfile
    assert not manifest_warnings(ex, "gguf")
    assert main(["export", "pte", "--run", str(run)]) == 0, capsys.readouterr().err
    assert (ex / "model.pte").stat().st_size > 0 and (ex / "tokenizer.json").exists()
    assert not (ex / "chat_template.jinja").exists()
    fmt = json.loads((ex / "prompt_format.json").read_text())  # the apps: plain completion after the BOS
    assert fmt["prompt"] == "{prompt}" and fmt["prompt_with_system"] is None and fmt["num_bos"] == 1
    assert tok.eos_token in fmt["stop"]
    assert not [w for w in manifest_warnings(ex, "pte") or [] if "prompt" in w or "template" in w]
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--runtimes", "eager,gguf", "--limit", "3", "--ppl-tokens", "256"]) == 0, (
        capsys.readouterr().err
    )
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["prompt_format"].startswith("plain text")
    assert {(r["variant"], r["runtime"]) for r in report["results"]} == {("bf16", "eager"), ("bf16", "gguf")}
    by = {r["runtime"]: r for r in report["results"]}
    assert math.isfinite(by["eager"]["perplexity"])
    assert by["gguf"]["perplexity"] == pytest.approx(by["eager"]["perplexity"], rel=0.02)  # f16 of the same model
    assert by["eager"]["n_tasks"] == 3 and "Questions asked in plain text" in (run / "eval" / "report.md").read_text()


def manifest_warnings(ex, name):
    return json.loads((ex / "manifest.json").read_text())[name].get("warnings")


def test_plain_prompts_for_a_model_without_template(base_dir):
    from edgeft.data import encode_prompt
    from edgeft.devices import evaluate as ev

    tok = AutoTokenizer.from_pretrained(base_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 6?"}]
    ctx = encode_prompt(tok, messages)
    assert (
        ctx
        == [tok.bos_token_id]
        + tok("Be brief.\n\nQuestion: What is 7 * 6?\nAnswer:", add_special_tokens=False)["input_ids"]
    )
    ctx2, conts = ev.encode_choices(tok, messages, ["42", "48"])
    assert ctx2 == ctx
    for c, cont in zip(["42", "48"], conts):  # the answer line: " choice" and its newline, no EOS
        assert tok.decode(cont) == f" {c}\n" and tok.eos_token_id not in cont
        full = tok(tok.decode(ctx[1:]) + f" {c}\n", add_special_tokens=True)["input_ids"]
        assert ctx + cont == full


@pytest.mark.parametrize(
    "data,expected",
    [
        (
            "builtin:tasks",
            r"; \d+ of \d+ rows of builtin:tasks are conversations \(chat format; the first, row 1: \[\{",
        ),
        ("alpaca", r"; 2 of 2 rows of \S+alpaca.jsonl are conversations \(alpaca format; the first, row 1: \[\{"),
    ],
)
def test_conversations_on_a_base_model_are_one_error_naming_the_rows(base_dir, tmp_path, capsys, data, expected):
    import re

    path = tmp_path / "alpaca.jsonl"
    path.write_text(
        json.dumps({"instruction": "Add 2 and 2.", "output": "4"})
        + "\n"
        + json.dumps({"instruction": "Add 3 and 3.", "output": "6"})
        + "\n"
    )
    out = tmp_path / "run"
    spec = str(path) if data == "alpaca" else data
    assert main(["train", "--model", str(base_dir), "--data", spec, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the tokenizer of {base_dir} has no chat template; " in err[0], err
    assert re.search(expected, err[0]), err
    assert "), which need one: pass --chat-template" in err[0]
    assert "raw text ('text' rows, .txt files) trains without one" in err[0]
    assert not out.exists()


def test_template_named_for_raw_text_that_does_not_fit_says_none_is_needed(base_dir, tmp_path, capsys):
    data, _ = _data(tmp_path, ".txt")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(base_dir),
                "--data",
                str(data),
                "--chat-template",
                "llama-3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat template 'llama-3' does not fit the tokenizer" in err[0], err
    assert "the data is raw text, which needs no chat template: omit --chat-template" in err[0]
    assert not out.exists()


def test_text_rows_keep_tokenizer_bos_and_eos(base_dir):
    """Documents start with the BOS the tokenizer adds and end with its EOS (no template involved)."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = encode_dataset(tok, NOTES, 64)
    starts = [s["input_ids"] for r in rows for s in sequences(r) if s["input_ids"][0] == tok.bos_token_id]
    assert len(starts) == len(NOTES)
    ends = [s["input_ids"][-1] for r in rows for s in sequences(r)]
    assert ends.count(tok.eos_token_id) == len(NOTES)
