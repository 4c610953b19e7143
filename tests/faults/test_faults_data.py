"""Fault injection, data: every bad data file is one error line naming the file (and its line), exit 2, before any
model work, and nothing is written (no run directory appears; the data file is untouched)."""

from __future__ import annotations

import json

import pytest
from faultkit import TRAIN, assert_one_error

GOOD = json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
CSV_HEAD = "prompt,completion\n"

CASES = {
    # name: (file name, bytes, expected substrings of the one error line)
    "jsonl-invalid-utf8": (
        "d.jsonl",
        (GOOD + "\n").encode() + b'{"text": "caf\xe9"}\n',
        ["d.jsonl:2", "not valid UTF-8"],
    ),
    "txt-invalid-utf8": ("d.txt", b"line one\nline two \xff\xfe\n", ["d.txt:2", "not valid UTF-8", "0xff"]),
    "csv-invalid-utf8": ("d.csv", (CSV_HEAD + "a,b\n").encode() + b"c\x80,d\n", ["d.csv:3", "not valid UTF-8"]),
    "json-invalid-utf8": ("d.json", b'[{"text": "\xc3\x28"}]', ["d.json:1", "not valid UTF-8"]),
    # a quote opened mid-file and closed a line later swallows a whole row into one field
    "csv-broken-quote-merges-rows": (
        "d.csv",
        (CSV_HEAD + 'a,b\n"What is 2+2,4\nWhat is 3+3",6\nc,d\n').encode(),
        ["d.csv:3", "closing quote missing"],
    ),
    "csv-unclosed-quote-to-eof": (
        "d.csv",
        (CSV_HEAD + 'a,b\n"What is 2+2,4\nc,d\n').encode(),
        ["d.csv", "malformed CSV"],
    ),
    "csv-text-after-closing-quote": (
        "d.csv",
        (CSV_HEAD + 'a,b\n"What" is 2+2,4\n').encode(),
        ["d.csv:3", "malformed CSV"],
    ),
    "csv-extra-field": ("d.csv", (CSV_HEAD + "a,b\nc,d,e\n").encode(), ["d.csv:3", "3 fields where the header has 2"]),
    "csv-missing-field": ("d.csv", (CSV_HEAD + "a,b\nc\n").encode(), ["d.csv:3", "1 fields where the header has 2"]),
    "tsv-extra-field": ("d.tsv", b"prompt\tcompletion\na\tb\tc\n", ["d.tsv:2", "3 fields"]),
    "every-assistant-reply-empty": (
        "d.jsonl",
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}) + "\n"
        ).encode(),
        ["d.jsonl:1", "every assistant message is empty"],
    ),
    "sharegpt-empty-reply": (
        "d.jsonl",
        (
            json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}) + "\n"
        ).encode(),
        ["d.jsonl:1", "every assistant message is empty"],
    ),
    "jsonl-not-json": ("d.jsonl", (GOOD + "\n{not json\n").encode(), ["d.jsonl:2", "not valid JSON"]),
    "jsonl-not-an-object": ("d.jsonl", (GOOD + "\n[1, 2]\n").encode(), ["d.jsonl:2", "expected a JSON object"]),
    "json-not-a-list": ("d.json", b'{"a": 1, "b": 2}', ["d.json", "expected a JSON list of objects"]),
    "empty-file": ("d.jsonl", b"\n\n", ["the dataset is empty"]),
    "unknown-columns": ("d.jsonl", b'{"foo": "bar"}\n', ["cannot tell the format", "'foo'"]),
    "alpaca-missing-output": (
        "d.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
        ["d.jsonl:2", "'output'"],
    ),
    "no-assistant-turn": (
        "d.jsonl",
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n").encode(),
        ["d.jsonl:1", "no assistant message"],
    ),
    "unknown-role": (
        "d.jsonl",
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n").encode(),
        ["d.jsonl:1", "role 'robot'"],
    ),
    "parquet-garbage": ("d.parquet", b"PAR1 this is not parquet", ["d.parquet", "not a readable Parquet file"]),
    "unsupported-suffix": ("d.xlsx", b"PK\x03\x04", ["unsupported data file type '.xlsx'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_one_line_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    name, content, expected = CASES[case]
    monkeypatch.chdir(tmp_path)
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "run"
    assert_one_error([*TRAIN, "--data", str(data), "--out", str(out)], capsys, expected, keep=[data])
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_missing_data_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_error(
        [*TRAIN, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "run")], capsys, "data file not found"
    )
    assert not (tmp_path / "run").exists()


def test_a_quoted_multiline_field_is_still_read(tmp_path):
    """The CSV checks refuse a stray quote, not a real multi-line field."""
    from edgeft.data.formats import load_file

    p = tmp_path / "ok.csv"
    p.write_text(CSV_HEAD + '"Write two lines","first\nsecond"\n"And, with a comma",yes\n')
    assert load_file(p) == [
        [{"role": "user", "content": "Write two lines"}, {"role": "assistant", "content": "first\nsecond"}],
        [{"role": "user", "content": "And, with a comma"}, {"role": "assistant", "content": "yes"}],
    ]
