"""bench/device_fit.py: the paired difference against hand-counted answers, and a run's fit verdicts against its
budget."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from edgeft.qat import plan as fit

_BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # device_fit.py imports its sibling accuracy.py
_spec = importlib.util.spec_from_file_location("bench_device_fit", _BENCH / "device_fit.py")
D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(D)


def test_paired_difference_counts():
    ids = [f"q{i}" for i in range(40)]
    a = {i: k % 2 == 0 for k, i in enumerate(ids)}
    same = D.paired_difference(a, dict(a))
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0] and same["a_only"] == same["b_only"] == 0
    b = dict(a)
    for i in ids[:6:2]:  # three questions only `a` answers right
        b[i] = False
    b.pop("q39")  # a question one run lacks is not compared
    d = D.paired_difference(a, b)
    assert d["n"] == 39 and (d["a_only"], d["b_only"]) == (3, 0)
    assert d["difference"] == pytest.approx(3 / 39) and d["ci"][0] >= 0 and d["ci"][0] <= 3 / 39 <= d["ci"][1]


def test_describe_run_checks_the_budget(tmp_path):
    shape = fit.ModelShape(
        (fit.Linear("model.layers.0.mlp.down_proj", 256, 512),),
        (1024, 128),
        512,
        2,
        {"layers": 2, "kv_heads": 2, "head_dim": 32, "vocab": 1024, "hidden": 128},
    )
    plan = fit.choose(
        shape, {32: {"model.layers.0.mlp.down_proj": 0.1}}, fit.Budget(device="pixel-8", max_size_mb=0.5, context=256)
    )
    run = tmp_path / "r"
    (run / "converted").mkdir(parents=True)
    (run / "exports").mkdir()
    (run / "converted" / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "hidden_size": 128,
                "vocab_size": 1024,
            }
        )
    )
    (run / "converted" / "scheme.json").write_text(
        json.dumps({"plan": plan.qat_plan().to_dict(), "int8_linears": list(plan.int8_modules)})
    )
    plan.write(run)
    (run / "exports" / "model.pte").write_bytes(b"\0" * int(0.4 * fit.MB))
    (run / "exports" / "model-q4_0.gguf").write_bytes(b"\0" * int(0.6 * fit.MB))  # over the 0.5 MB cap
    info = D.describe_run(run)
    assert info["plan"] == "auto" and info["budget"]["device"] == "pixel-8" and info["budget"]["context"] == 256
    assert info["pte"]["fits"] and not info["gguf"]["fits"]
    # another run (the uniform one) judged by this run's budget: over the cap is "no"; an artifact the budget does
    # not target (--fit-artifact pte) fits whatever its size
    (run / "qat_plan.json").unlink()
    assert D.describe_run(run)["gguf"]["fits"]  # no plan, no budget
    judged = D.describe_run(run, plan.budget)
    assert judged["budget"]["max_size_mb"] == 0.5 and judged["pte"]["fits"] and not judged["gguf"]["fits"]
    pte_only = D.describe_run(run, fit.Budget(max_size_mb=0.5, artifact="pte"))
    assert pte_only["gguf"]["fits"] and not pte_only["gguf"]["budgeted"] and pte_only["pte"]["budgeted"]
    assert info["pte"]["predicted_mb"] == pytest.approx(plan.predicted["pte"]["bytes"] / fit.MB)


def test_perplexity_ratio_is_the_pooled_ratio_with_a_chunk_interval():
    tokens = [255] * 8
    b = {"nll": [500.0 + 10 * i for i in range(8)], "tokens": tokens}
    a = {"nll": [x - 255 * math.log(1.1) for x in b["nll"]], "tokens": tokens}  # every chunk 1.1x less perplexed
    r = D.perplexity_ratio(a, b, n_boot=2000)
    assert r["ratio"] == pytest.approx(1 / 1.1) and r["ci"] == pytest.approx([1 / 1.1, 1 / 1.1]) and r["chunks"] == 8
    same = D.perplexity_ratio(b, b, n_boot=2000)
    assert same["ratio"] == pytest.approx(1.0)
    noisy = {"nll": [x + (25 if i % 2 else -25) for i, x in enumerate(b["nll"])], "tokens": tokens}
    r = D.perplexity_ratio(noisy, b, n_boot=2000)
    assert r["ci"][0] < r["ratio"] < r["ci"][1] and r["ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same held-out chunks"):
        D.perplexity_ratio({"nll": [1.0], "tokens": [3]}, b)
