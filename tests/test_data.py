"""Data: built-in tasks against independently computed answers, file formats, loss masking, collation."""

import copy
import datetime as dt
import json
import re

import pytest
from transformers import AutoTokenizer

from edgeft.data import IGNORE_INDEX, collate, encode_conversation, encode_dataset, load_conversations, tasks
from edgeft.errors import EdgeftError
from edgeft.models import resolve_model

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def test_builtin_tasks_are_deterministic_and_disjoint():
    a, b = tasks.generate("train"), tasks.generate("train")
    assert a == b and len(a) == tasks.SPLIT_SIZES["train"]
    test = tasks.generate("test")
    assert len(test) == tasks.SPLIT_SIZES["test"]
    assert not {r["question"] for r in a} & {r["question"] for r in test}
    assert {r["task"] for r in test} == {"arithmetic", "date", "units"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_task_answers_are_exact(split):
    """Re-derive every answer from the question text with independent code."""
    units = {
        ("kilometers", "meters"): 1000,
        ("meters", "centimeters"): 100,
        ("kilograms", "grams"): 1000,
        ("liters", "milliliters"): 1000,
        ("hours", "minutes"): 60,
        ("minutes", "seconds"): 60,
        ("days", "hours"): 24,
        ("meters", "millimeters"): 1000,
        ("grams", "kilograms"): 0.001,
        ("minutes", "hours"): 1 / 60,
        ("feet", "inches"): 12,
        ("yards", "feet"): 3,
    }
    for r in tasks.generate(split):
        q, ans = r["question"], r["answer"]
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", q):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(ans) == {"+": a + b, "-": a - b, "*": a * b}[op], q
        elif m := re.fullmatch(r"What day of the week was (\S+)\?", q):
            assert ans == WEEKDAYS[dt.date.fromisoformat(m[1]).weekday()], q
        elif m := re.fullmatch(r"What is the date (\d+) days (after|before) (\S+)\? Use YYYY-MM-DD\.", q):
            d = dt.timedelta(days=int(m[1])) * (1 if m[2] == "after" else -1)
            assert ans == (dt.date.fromisoformat(m[3]) + d).isoformat(), q
        elif m := re.fullmatch(r"Convert (\S+) (\w+) to (\w+)\.", q):
            assert float(ans) == pytest.approx(float(m[1]) * units[(m[2], m[3])], rel=1e-12), q
        else:
            raise AssertionError(f"unrecognised question {q!r}")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_alpaca_and_messages_files(tmp_path):
    alp = _write(tmp_path / "a.jsonl", json.dumps({"instruction": "Add", "input": "1 2", "output": "3"}) + "\n\n")
    assert load_conversations(alp) == [
        [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    ]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    mf = _write(tmp_path / "m.jsonl", json.dumps({"messages": msgs}) + "\n")
    assert load_conversations(mf) == [msgs]
    csv = _write(tmp_path / "c.csv", "instruction,input,output\nName a color,,red\n")
    assert load_conversations(csv)[0][1]["content"] == "red"


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        (
            "missing.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "x"}\n',
            r"missing\.jsonl:2: .*'output'",
        ),
        ("empty.jsonl", "\n", r"empty"),
        ("cols.jsonl", '{"question": "a", "answer": "b"}\n', r"columns \['answer', 'question'\]"),
        ("role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n', r"role 'bot'"),
        ("x.xml", "hello", r"unsupported data file type"),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, name, content, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(EdgeftError, match=expected):
        load_conversations(path)


def test_missing_file_and_unknown_builtin():
    with pytest.raises(EdgeftError, match="not found"):
        load_conversations("/nonexistent/data.jsonl")
    with pytest.raises(EdgeftError, match="unknown built-in"):
        load_conversations("builtin:nope")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(resolve_model(request.param))


def test_labels_cover_assistant_turns_only(tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6 exactly"},
    ]
    ex = encode_conversation(tokenizer, conv)
    assert len(ex["input_ids"]) == len(ex["labels"])
    kept = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "4<|im_end|>6 exactly<|im_end|>"
    # labels equal the input ids wherever they are set
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ex["input_ids"], ex["labels"]))


def test_all_too_long_is_an_error(tokenizer):
    conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]
    with pytest.raises(EdgeftError, match=r"every example is longer than max_seq_length=16 tokens \(the shortest"):
        encode_dataset(tokenizer, [conv], max_length=16)


def test_all_masked_dataset_names_the_template_and_a_row(tokenizer):
    """A template that never renders assistant turns leaves nothing to learn: one error with the template's name."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    with pytest.raises(EdgeftError, match=r"all labels masked with the 'odd' chat template .*first row: .*hello there"):
        encode_dataset(tokenizer, [conv], max_length=64, template_name="'odd'")


def test_collate_pads_right_without_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
