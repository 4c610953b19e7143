"""Per-question results of the evaluator (eval/questions.jsonl), checked against references that do not go through
the evaluator: runtimes that answer a chosen set of questions right, and the report's own accuracies."""

from __future__ import annotations

import json
import math

import pytest
import torch

from edgeft.config import TrainConfig, dump_yaml
from edgeft.data import encode_prompt, tasks
from edgeft.devices import evaluate as ev
from edgeft.models import resolve_model
from edgeft.rundir import RunDir

N = 12
# which exact-match questions each variant's fake runtime answers right (by position in the test split)
RIGHT = {"bf16": {0, 1, 2, 4, 7, 9}, "ptq": {2, 5}, "qat": {0, 2, 3, 9}}


# which choice each variant's fake runtime prefers, from the item's label
PICK = {"bf16": lambda label: label, "ptq": lambda label: 0, "qat": lambda label: (label + 1) % 4}


class AnswerRuntime:
    """Answers the questions in ``right`` with their exact answer and every other one with "wrong"; on a
    multiple-choice item it gives the tokens of choice ``pick(label)`` a large logit."""

    name = "eager"

    def __init__(self, tok, rows, mc_items, right, pick):
        self.vocab = len(tok)
        self.answers = {}
        for i, r in enumerate(rows):
            prompt = tuple(encode_prompt(tok, tasks.to_messages(r)[:1]))
            text = r["answer"] if i in right else "wrong"
            self.answers[prompt] = tok(text, add_special_tokens=False)["input_ids"]
        self.picks = {}
        for it in mc_items:
            ctx, _ = ev.encode_choices(tok, tasks.to_messages(it)[:1], it["choices"])
            self.picks[tuple(ctx)] = pick(it["label"])

    def logits(self, ids):
        return torch.zeros(len(ids), self.vocab)

    def continuation_logits(self, prefix, continuations):
        out = []
        for k, c in enumerate(continuations):
            rows = torch.zeros(len(c), self.vocab)
            if k == self.picks[tuple(prefix)]:
                rows[torch.arange(len(c)), torch.tensor(c)] = 50.0
            out.append(rows)
        return out

    def generate(self, ids, max_new_tokens, stop_ids):
        return self.answers[tuple(ids)][:max_new_tokens]

    def close(self):
        pass


@pytest.fixture()
def fake_run(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(resolve_model("tiny-llama")))
    run = RunDir(tmp_path / "run")
    run.converted.mkdir(parents=True)
    tok.save_pretrained(run.converted)
    run.scheme.write_text(json.dumps({"plan": {"scheme": "int8-int4"}}))
    run.config_file.write_text(dump_yaml(TrainConfig(model="tiny-llama", qat="int8-int4")))
    rows, mc_items = tasks.generate("test")[:N], tasks.multiple_choice("test")[:N]
    for r in rows:  # the premise: an exact answer survives the tokenizer's round trip
        assert tok.decode(tok(r["answer"], add_special_tokens=False)["input_ids"]).strip() == r["answer"]
    monkeypatch.setattr(ev, "_variant_sources", lambda run: {v: (run.root / v, run.root / v) for v in ev.VARIANTS})
    monkeypatch.setattr(
        ev,
        "load_runtime",
        lambda kind, path, **kw: AnswerRuntime(tok, rows, mc_items, RIGHT[path.name], PICK[path.name]),
    )
    return run.root, rows


def test_questions_file_records_every_question_and_matches_the_report(fake_run):
    run, rows = fake_run
    report = ev.evaluate_run(run, runtimes=["eager"], limit=N, progress=False)
    got = ev.read_questions(run)
    assert got is not None and report["questions"]["rows"] == len(got) == 3 * 2 * N
    mc_items = tasks.multiple_choice("test")[:N]
    by_variant = {r["variant"]: r for r in report["results"]}
    for v in ev.VARIANTS:
        exact = sorted((q for q in got if q["variant"] == v and q["kind"] == "exact"), key=lambda q: q["index"])
        mc = sorted((q for q in got if q["variant"] == v and q["kind"] == "mc"), key=lambda q: q["index"])
        assert [q["index"] for q in exact] == list(range(N)) == [q["index"] for q in mc]
        # the runtime's built-in right answers, and the report's accuracy, from the rows
        assert {q["index"] for q in exact if q["correct"]} == RIGHT[v]
        assert [q["got"] for q in exact] == [r["answer"] if i in RIGHT[v] else "wrong" for i, r in enumerate(rows)]
        assert sum(q["correct"] for q in exact) == round(by_variant[v]["accuracy"] * N)
        assert [q["picked"] for q in mc] == [PICK[v](it["label"]) for it in mc_items]
        assert [q["correct"] for q in mc] == [PICK[v](it["label"]) == it["label"] for it in mc_items]
        assert sum(q["correct"] for q in mc) == round(by_variant[v]["mc_accuracy"] * N)
    # ids: one per question, the same in every variant, and the same in another evaluation of a smaller set
    ids = {(q["kind"], q["index"]): q["id"] for q in got}
    assert all(ids[q["kind"], q["index"]] == q["id"] for q in got)
    assert len(set(ids.values())) == 2 * N
    assert [ids["exact", i] for i in range(N)] == [ev.question_id(r) for r in rows]
    ev.evaluate_run(run, runtimes=["eager"], variants=["qat"], limit=N // 2, progress=False)
    again = ev.read_questions(run)
    assert {q["variant"] for q in again} == {"qat"} and len(again) == 2 * (N // 2)
    assert all(q["id"] == ids[q["kind"], q["index"]] for q in again)
    # the report's recoveries are resampled from these rows, and perplexity's from the per-chunk NLL sums
    from edgeft.devices.recovery import accuracy_recovery

    rec = report["recovery"]["eager"]
    assert rec["accuracy"] == accuracy_recovery({v: [i in RIGHT[v] for i in range(N)] for v in ev.VARIANTS})
    assert rec["mc_accuracy"] == accuracy_recovery(
        {v: [PICK[v](it["label"]) == it["label"] for it in mc_items] for v in ev.VARIANTS}
    )
    assert rec["perplexity"]["reason"] == "ptq_within_noise"  # the fake runtimes' logits are all alike
    chunks = by_variant["bf16"]["ppl_chunks"]
    assert by_variant["bf16"]["perplexity"] == pytest.approx(math.exp(sum(chunks["nll"]) / sum(chunks["tokens"])))
    # the report is small: per-question results live only in the JSONL
    assert "per_question" not in json.dumps(json.loads((run / "eval" / "report.json").read_text()))


def test_a_questions_file_the_report_does_not_name_is_not_read(fake_run):
    run, _ = fake_run
    assert ev.read_questions(run) is None  # nothing evaluated yet
    ev.evaluate_run(run, runtimes=["eager"], variants=["bf16"], limit=4, progress=False)
    assert len(ev.read_questions(run)) == 8
    path = run / "eval" / ev.QUESTIONS_FILE
    path.write_text(path.read_text().replace('"correct": false', '"correct": true', 1))
    assert ev.read_questions(run) is None
    rep = json.loads((run / "eval" / "report.json").read_text())
    del rep["questions"]  # a report from before per-question results
    (run / "eval" / "report.json").write_text(json.dumps(rep))
    assert ev.read_questions(run) is None
