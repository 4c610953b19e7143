"""Multiple-choice accuracy (length-normalised log-likelihood) and user evaluation data.

The scorer is checked against references that do not go through it: the HF model's own log_softmax summed by
hand, synthetic runtimes whose preferred answer is built in, and the .pte/GGUF runtimes against eager.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from decimal import Decimal

import pytest
import torch

from edgeft.cli import main
from edgeft.data import encode_prompt, tasks
from edgeft.devices import evaluate as ev
from edgeft.devices import regression
from edgeft.devices.runtimes import EagerRuntime
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    src = resolve_model("tiny-llama")
    model, tok = load_model(src)
    return src, model.eval(), tok


# --- the built-in multiple-choice set -------------------------------------------------------------------


def test_builtin_mc_set_is_deterministic_with_plausible_distractors():
    items = tasks.multiple_choice("test")
    assert items == tasks.multiple_choice("test") and len(items) == len(tasks.generate("test"))
    assert [{k: it[k] for k in ("task", "question", "answer")} for it in items] == tasks.generate("test")
    labels = [it["label"] for it in items]
    assert set(labels) == {0, 1, 2, 3} and max(labels.count(i) for i in range(4)) < 0.4 * len(items)
    for it in items:
        ch, ans = it["choices"], it["answer"]
        assert len(ch) == 4 and len(set(ch)) == 4 and ch[it["label"]] == ans
        wrong = [c for c in ch if c != ans]
        if ans in tasks._WEEKDAYS:
            assert all(c in tasks._WEEKDAYS for c in wrong)
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", ans):
            assert all(dt.date.fromisoformat(c) for c in wrong)
        elif it["task"] == "arithmetic":  # the same number with one digit off by one
            for c in wrong:
                assert len(c) == len(ans) and sum(a != b for a, b in zip(c, ans)) == 1
                assert all(abs(int(a) - int(b)) == 1 for a, b in zip(c, ans) if a != b)
        else:
            assert it["task"] == "units" and all(Decimal(c) >= 0 for c in wrong)
    # a row's choices depend on the row only, not on which rows come with it
    assert tasks.with_choices(tasks.generate("test")[7]) == items[7]


# --- the scorer against independent references ------------------------------------------------------------


def test_eager_scores_equal_a_hand_computation_with_the_hf_model(tiny):
    _, model, tok = tiny
    item = tasks.multiple_choice("test")[0]
    messages = tasks.to_messages(item)[:1]
    ctx, conts = ev.encode_choices(tok, messages, item["choices"])
    # the prompt is exact match's prompt; a continuation is the choice's text then the end-of-turn token
    assert ctx == encode_prompt(tok, messages)
    for c, cont in zip(item["choices"], conts):
        assert cont[-1] == tok.eos_token_id and tok.decode(cont[:-1]) == c
    got = ev.choice_scores(EagerRuntime(model), ctx, conts)  # through the KV-cache path, prompt once
    want = []
    for cont in conts:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
        total = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        want.append(total / len(cont))
    assert got == pytest.approx(want, abs=1e-6)
    full = [float(ev.continuation_logprobs(EagerRuntime(model), ctx, c).mean()) for c in conts]
    assert full == pytest.approx(want, abs=1e-9)
    res = ev.multiple_choice(EagerRuntime(model), tok, [item])
    assert res["samples"][0]["picked"] == max(range(4), key=want.__getitem__)
    assert res["mc_accuracy"] == float(res["samples"][0]["picked"] == item["label"])


class TableRuntime:
    """Uniform logits except where a prefix is listed: ``table[tuple(prefix)] = {token: logit}``."""

    name = "table"

    def __init__(self, vocab: int, table: dict[tuple[int, ...], dict[int, float]]):
        self.vocab, self.table = vocab, table

    def logits(self, ids):
        out = torch.zeros(len(ids), self.vocab)
        for i in range(len(ids)):
            for t, v in self.table.get(tuple(ids[: i + 1]), {}).items():
                out[i, t] = v
        return out


def test_the_scorer_picks_the_choice_the_runtime_is_made_to_prefer(tiny):
    _, _, tok = tiny
    vocab = len(tok)
    items = tasks.multiple_choice("test")[:6]
    for it in items:
        ctx, conts = ev.encode_choices(tok, tasks.to_messages(it)[:1], it["choices"])
        for target in range(4):
            seq = ctx + conts[target]
            table = {tuple(seq[: len(ctx) + j]): {seq[len(ctx) + j]: 8.0} for j in range(len(conts[target]))}
            rt = TableRuntime(vocab, table)
            scores = ev.choice_scores(rt, ctx, conts)
            # by hand: log p = 8 - log(e^8 + V - 1) for a boosted token, -log(e^8 + V - 1) for another token
            # where the target's path boosts one, -log V off that path
            boosted, beside, flat = (
                8.0 - math.log(math.exp(8.0) + vocab - 1),
                -math.log(math.exp(8.0) + vocab - 1),
                -math.log(vocab),
            )
            for k, cont in enumerate(conts):
                shared = 0  # a wrong choice shares the target's boosted tokens up to where they differ
                while shared < min(len(cont), len(conts[target])) and cont[shared] == conts[target][shared]:
                    shared += 1
                off = len(cont) - shared
                want = (shared * boosted + min(off, 1) * beside + max(off - 1, 0) * flat) / len(cont)
                assert scores[k] == pytest.approx(want, abs=1e-9)
            res = ev.multiple_choice(rt, tok, [{**it, "label": target}])
            assert res["mc_accuracy"] == 1.0 and res["samples"][0]["picked"] == target


def test_length_normalisation_and_ties(tiny):
    _, _, tok = tiny
    messages = [{"role": "user", "content": "Pick one."}]
    choices = ["7", "seven hundred thousand"]
    ctx, conts = ev.encode_choices(tok, messages, choices)
    short, long = conts
    assert len(long) > len(short) + 1
    # the short answer's tokens are likely (-1 each), the long one's likelier still per token but more of them
    table = {}
    for cont, logit in ((short, 3.0), (long, 5.0)):
        seq = ctx + cont
        for j in range(len(cont)):
            table.setdefault(tuple(seq[: len(ctx) + j]), {})[seq[len(ctx) + j]] = logit
    rt = TableRuntime(len(tok), table)
    sums = [float(ev.continuation_logprobs(rt, ctx, c).sum()) for c in conts]
    means = ev.choice_scores(rt, ctx, conts)
    assert sums[0] > sums[1] and means[1] > means[0]  # the sum would pick the short one; the mean does not
    item = {"question": "q", "messages": messages, "choices": choices, "label": 1}
    assert ev.multiple_choice(rt, tok, [item])["mc_accuracy"] == 1.0
    # a tie goes to the first choice
    flat = TableRuntime(len(tok), {})
    same = {"question": "q", "messages": messages, "choices": ["12", "34"], "label": 0}
    assert ev.multiple_choice(flat, tok, [same])["samples"][0]["picked"] == 0


def test_pte_and_gguf_mc_scores_agree_with_eager(tiny, tmp_path):
    pytest.importorskip("executorch")
    pytest.importorskip("llama_cpp")
    from edgeft.devices.runtimes import load_runtime
    from edgeft.exporters import gguf, pte

    src, model, tok = tiny
    pte.export(src, tmp_path / "pte", max_seq_len=64)
    gguf.export(src, tmp_path / "model-f32.gguf", quant="f32")
    items = tasks.multiple_choice("test")[:6]
    encoded = [ev.encode_choices(tok, tasks.to_messages(it)[:1], it["choices"]) for it in items]
    eager = [ev.choice_scores(EagerRuntime(model), ctx, conts) for ctx, conts in encoded]
    for kind, path in (("pte", tmp_path / "pte" / "model.pte"), ("gguf", tmp_path / "model-f32.gguf")):
        rt = load_runtime(kind, path)
        try:
            got = [ev.choice_scores(rt, ctx, conts) for ctx, conts in encoded]  # prompt once, then each choice
            acc = ev.multiple_choice(rt, tok, items)["mc_accuracy"]
            # the shared-prompt rows are the rows of one fresh full-sequence pass
            ctx, conts = encoded[0]
            for rows, c in zip(rt.continuation_logits(ctx, conts), conts):
                full = rt.logits(ctx + c)[len(ctx) - 1 : len(ctx) + len(c) - 1]
                assert rows.shape == full.shape and float((rows - full).abs().max()) < 1e-3 * float(full.abs().max()), (
                    kind
                )
        finally:
            rt.close()
        for g, e in zip(got, eager):
            assert g == pytest.approx(e, abs=2e-3), kind
            assert max(range(4), key=g.__getitem__) == max(range(4), key=e.__getitem__), kind
        assert acc == ev.multiple_choice(EagerRuntime(model), tok, items)["mc_accuracy"]


# --- the user's evaluation data ---------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_files_replace_the_builtin_set_of_their_kind(tmp_path):
    txt = tmp_path / "held.txt"
    txt.write_text("Some held-out prose about the sea.\n")
    em = _jsonl(
        tmp_path / "em.jsonl", [{"prompt": "2+2?", "answer": 4}, {"question": "Capital of France?", "answer": "Paris"}]
    )
    mc = _jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": "Sky colour?", "choices": ["green", "blue"], "answer": 1},
            {
                "prompt": "Largest planet?",
                "choices": ["Mars", "Jupiter", "Venus"],
                "answer": "Jupiter",
                "system": "Be brief.",
            },
        ],
    )
    builtin = ev.builtin_eval_data(5)
    assert len(builtin.tasks) == len(builtin.mc) == 5 and builtin.heldout == ev.heldout_text()
    only_mc = ev.load_eval_data([mc], 5)
    assert only_mc.tasks == builtin.tasks and only_mc.heldout == builtin.heldout
    assert [it["label"] for it in only_mc.mc] == [1, 1] and only_mc.sources["mc"] == str(mc)
    assert only_mc.mc[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Largest planet?"},
    ]
    d = ev.load_eval_data([txt, em, mc], 5)
    assert d.heldout == "Some held-out prose about the sea."
    assert [(t["question"], t["answer"]) for t in d.tasks] == [("2+2?", "4"), ("Capital of France?", "Paris")]
    assert d.tasks[0]["messages"] == [{"role": "user", "content": "2+2?"}]
    assert d.sources == {"heldout": str(txt), "tasks": str(em), "mc": str(mc)}
    # one file may hold both kinds
    both = ev.load_eval_data(
        [
            _jsonl(
                tmp_path / "both.jsonl",
                [{"prompt": "a", "answer": "b"}, {"prompt": "c", "choices": ["d", "e"], "answer": 0}],
            )
        ]
    )
    assert len(both.tasks) == len(both.mc) == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.csv", "a,b\n", "must be .txt"),
        ("e.txt", "  \n", "empty held-out text"),
        ("e.jsonl", "\n", "no task rows"),
        ("j.jsonl", '{"prompt": "a", "answer": "b"}\n{oops\n', ":2: not valid JSON"),
        ("p.jsonl", '{"answer": "b"}\n', 'needs a non-empty "prompt"'),
        ("a.jsonl", '{"prompt": "a"}\n', 'needs an "answer"'),
        ("c.jsonl", '{"prompt": "a", "choices": ["x"], "answer": 0}\n', "at least 2"),
        ("i.jsonl", '{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n', "outside the 2 choices"),
        ("t.jsonl", '{"prompt": "a", "choices": ["x", "y"], "answer": "z"}\n', "index (0-based) or one of the choices"),
        ("d.jsonl", '{"prompt": "a", "choices": ["x", "x"], "answer": 0}\n', "duplicates"),
        ("b.jsonl", '{"prompt": "a", "choices": ["x", "y"], "answer": true}\n', "index (0-based)"),
    ],
)
def test_bad_evaluation_data_is_one_error_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(EdgeftError, match=re.escape(message)):
        ev.load_eval_data([path])
    # the CLI fails on it before looking for a run: one line on stderr, exit 2
    assert main(["eval", "--run", str(tmp_path / "no-run"), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_data_file(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "evaluation data file not found" in capsys.readouterr().err


# --- report, plot, golden -----------------------------------------------------------------------------


def test_report_plot_and_golden_carry_mc_accuracy(tmp_path):
    rows = []
    for v, (ppl, acc, mc) in {"bf16": (10.0, 0.6, 0.8), "ptq": (14.0, 0.2, 0.4), "qat": (11.0, 0.5, 0.7)}.items():
        rows.append(
            {
                "variant": v,
                "runtime": "pte",
                "perplexity": ppl,
                "accuracy": acc,
                "mc_accuracy": mc,
                "size_mb": 3.0,
                "tokens_per_s": 50.0,
            }
        )
    data = ev.builtin_eval_data(4)
    report = {
        "model": "m",
        "mode": "lora",
        "qat": "int8-int4",
        "heldout_tokens": 100,
        "task_examples": 4,
        "mc_examples": 4,
        "mc_chance": 0.25,
        "eval_data": data.sources,
        "results": rows,
        "recovery": {
            "pte": {
                "perplexity": ev.recovery(10, 14, 11, False),
                "accuracy": ev.recovery(0.6, 0.2, 0.5, True),
                "mc_accuracy": ev.recovery(0.8, 0.4, 0.7, True),
            }
        },
    }
    assert report["recovery"]["pte"]["mc_accuracy"] == pytest.approx(0.75)
    md = ev.render_markdown(report)
    assert "| multiple choice |" in md and "| 70.0% |" in md and "chance 25%" in md
    # recoveries without per-question results (a report from before intervals): the points alone, per runtime
    assert "| pte | 75% | 75% | 75% |" in md
    ev._plot(report, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    golden = regression.golden_from_report(report)
    mc = [m for m in golden["metrics"] if m["metric"] == "mc_accuracy"]
    assert len(mc) == 3 and all(m["abs_tol"] == 0.05 for m in mc)
    assert regression.check(report, golden) == []
    rows[2]["mc_accuracy"] = 0.5
    assert regression.check(report, golden) == ["qat/pte/mc_accuracy: 0.5 drifted from 0.7 (tolerance ±0.05)"]
    # a report from before multiple choice: no mc rows in its golden, and it still renders
    old = {
        **report,
        "results": [{k: v for k, v in r.items() if k != "mc_accuracy"} for r in rows],
        "recovery": {"pte": {"perplexity": 0.75, "accuracy": 0.75}},
    }
    assert all(m["metric"] != "mc_accuracy" for m in regression.golden_from_report(old)["metrics"])
    assert "| – |" in ev.render_markdown(old) and "| pte | 75% | 75% | – |" in ev.render_markdown(old)
