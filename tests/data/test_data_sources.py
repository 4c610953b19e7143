"""Data sources and row formats: every file type, ShareGPT, messages, raw text, column merge, splits."""

import json

import pytest

from edgeft.data import (
    encode_dataset,
    encode_text,
    extend_conversations,
    load_records,
    merge_columns,
    split_train_eval,
    standardize_sharegpt,
)
from edgeft.data.formats import looks_like_hub_name
from edgeft.errors import EdgeftError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_sharegpt_is_standardised_to_messages(tmp_path):
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "3+3?"},
        {"from": "gpt", "value": "6"},
    ]
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"conversations": turns}) + "\n")
    assert load_records(str(p)) == [CONV]
    assert standardize_sharegpt([{"from": "bot", "value": "x"}]) == [{"role": "assistant", "content": "x"}]
    p.write_text(json.dumps({"conversations": [{"from": "narrator", "value": "x"}]}) + "\n")
    with pytest.raises(EdgeftError, match=r"s\.jsonl:1: ShareGPT turn 0 is from 'narrator'"):
        load_records(str(p))


def test_multi_turn_messages_with_system_in_every_file_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CONV}, {"messages": CONV[1:3]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.json").write_text(json.dumps(rows))
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    with open(tmp_path / "m.csv", "w") as f:  # CSV cells hold the messages as JSON text
        import csv

        w = csv.writer(f)
        w.writerow(["messages"])
        for r in rows:
            w.writerow([json.dumps(r["messages"])])
    for name in ["m.jsonl", "m.json", "w.json", "m.parquet", "m.csv"]:
        assert load_records(str(tmp_path / name)) == [CONV, CONV[1:3]], name


def test_datasets_object_and_prompt_completion_and_tsv(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "Capital of France?", "completion": "Paris"}])
    assert load_records(ds) == [
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    ]
    (tmp_path / "a.tsv").write_text("instruction\tinput\toutput\nAdd\t1 2\t3\n")
    assert load_records(str(tmp_path / "a.tsv"))[0][0]["content"] == "Add\n\n1 2"


def test_raw_text_chunks_cover_the_document(tmp_path):
    from transformers import AutoTokenizer

    from edgeft.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-qwen3"))
    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "book.txt").write_text(text)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert load_records(str(tmp_path / "book.txt")) == [text] == load_records(str(tmp_path / "t.jsonl"))
    chunks = encode_text(tok, text, max_length=64)
    whole = tok(text)["input_ids"] + [tok.eos_token_id]
    assert all(len(c["input_ids"]) <= 64 for c in chunks) and len(chunks) == -(-len(whole) // 64)
    assert [t for c in chunks for t in c["input_ids"]] == whole  # nothing lost or duplicated
    assert all(c["labels"] == c["input_ids"] for c in chunks)  # continued pretraining: every token is a target
    rows = encode_dataset(tok, [text], max_length=64)  # training packs: full rows, each continuing the last
    assert all(len(r["input_ids"]) == 64 for r in rows[:-1]) and rows[0]["input_ids"] == whole[:64]
    assert [t for k, r in enumerate(rows) for t in r["input_ids"][k > 0 :]] == whole  # one token of context repeated


TITANIC = [
    {"Embarked": "S", "Age": "23", "Fare": "", "Survived": "no"},
    {"Embarked": "", "Age": "18", "Fare": "7.25", "Survived": "yes"},
    {"Embarked": "C", "Age": None, "Fare": float("nan"), "Survived": "yes"},
]
TEMPLATE = "[[The passenger embarked from {Embarked}.]][[ Their age is {Age}.]][[ Their fare is ${Fare}.]]"


def test_column_merge_drops_empty_optional_parts():
    rows = [(f"row {i}", r) for i, r in enumerate(TITANIC, 1)]
    convs = merge_columns(rows, TEMPLATE, "Survived", "titanic")
    assert [c[0]["content"] for c in convs] == [
        "The passenger embarked from S. Their age is 23.",
        "Their age is 18. Their fare is $7.25.",
        "The passenger embarked from C.",
    ]
    assert [c[1] for c in convs] == [{"role": "assistant", "content": a} for a in ("no", "yes", "yes")]
    assert merge_columns([("r", {"a": "1", "o": "x"})], "{{literal}} {a}", "o", "t")[0][0]["content"] == "{literal} 1"


@pytest.mark.parametrize(
    "template,output,expected",
    [
        ("Age {Agee}", "Survived", r"column\(s\) \['Agee'\] not found \(columns found: \['Age', 'Embarked', 'Fare', "),
        ("Age {Age}", "Survivd", r"\['Survivd'\] not found"),
        ("Age [[{Age}", "Survived", r"'\[\[' without a matching '\]\]'"),
        ("no columns", "Survived", r"names no column"),
    ],
)
def test_column_merge_errors(template, output, expected):
    rows = [(f"row {i}", r) for i, r in enumerate(TITANIC, 1)]
    with pytest.raises(EdgeftError, match=expected):
        merge_columns(rows, template, output, "titanic")


def test_conversation_extension_merges_seeded_rows(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(
        "Embarked,Age,Fare,Survived\n"
        + "\n".join(
            f"{r['Embarked']},{r['Age'] or ''},{'' if r['Fare'] != r['Fare'] else r['Fare']},{r['Survived']}"
            for r in TITANIC
        )
        + "\n"
    )
    one = load_records(str(p), prompt_template=TEMPLATE, output_column="Survived")
    three = load_records(
        str(p),
        prompt_template=TEMPLATE,
        output_column="Survived",
        conversation_extension=3,
        system_prompt="You predict survival.",
        seed=1,
    )
    assert len(three) == len(one)
    for i, conv in enumerate(three):
        assert conv[0] == {"role": "system", "content": "You predict survival."}
        assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * 3
        assert conv[1:3] == one[i]  # each conversation opens with its own row
        assert all(conv[k : k + 2] in one for k in (3, 5))  # followed by whole other rows
    assert three == load_records(
        str(p),
        prompt_template=TEMPLATE,
        output_column="Survived",
        conversation_extension=3,
        system_prompt="You predict survival.",
        seed=1,
    )
    assert extend_conversations(one, 1, 0) == one


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    tr, ev = split_train_eval(items, 0.1, seed=3)
    assert len(ev) == 10 and sorted(tr + ev) == items
    assert (tr, ev) == split_train_eval(items, 0.1, seed=3)
    assert ev != split_train_eval(items, 0.1, seed=4)[1]
    assert ev != items[-10:]  # shuffled, not the tail
    assert len(split_train_eval(items, 7, seed=0)[1]) == 7
    with pytest.raises(EdgeftError, match="leaves no training examples"):
        split_train_eval(items, 100, seed=0)


def test_hub_names_and_offline_error(monkeypatch):
    assert looks_like_hub_name("tatsu-lab/alpaca") and not looks_like_hub_name("data/train.jsonl")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EdgeftError, match=r"'nobody-xyz/no-such-set' is not a local file and the Hugging Face hub"):
        load_records("nobody-xyz/no-such-set")
