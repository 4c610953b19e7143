"""Pooling a recipe's accuracy over training seeds (bench/seed_pool.py, devices.recovery.pooled_accuracy_recovery),
on synthetic per-question results whose answer is known."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeft.devices.recovery import accuracy_recovery, pooled_accuracy_recovery

BENCH = Path(__file__).parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


A, P = _load("accuracy"), _load("seed_pool")


def _all(n: int, bf16: bool, ptq: bool, qat: bool) -> dict[str, list[bool]]:
    return {"bf16": [bf16] * n, "ptq": [ptq] * n, "qat": [qat] * n}


def test_the_pooled_interval_keeps_each_seed_its_own_questions():
    # seed A: QAT recovers every question PTQ loses, seed B none: every stratified resample pools to exactly 1/2,
    # where resampling the 40 questions together would move the ratio
    r = pooled_accuracy_recovery([_all(20, True, False, True), _all(20, True, False, False)])
    assert r["point"] == 0.5 and r["interval"] == [0.5, 0.5] and r["groups"] == 2 and r["n"] == 40


def test_one_seed_pools_to_its_own_recovery():
    rng = np.random.default_rng(3)
    g = {v: list(rng.random(200) < p) for v, p in (("bf16", 0.2), ("ptq", 0.1), ("qat", 0.17))}
    one, pooled = accuracy_recovery(g), pooled_accuracy_recovery([g])
    assert pooled["point"] == pytest.approx(one["point"]) and pooled["interval"] == pytest.approx(one["interval"])


def _result(path: Path, seed: int, correct: dict[str, list[bool]]) -> Path:
    iv = A.intervals(correct, n_boot=200)
    path.write_text(
        json.dumps(
            {
                "recipe": "default",
                "qat_max_steps": 180,
                "config": {"optim": {"seed": seed}},
                "date": "2026-12-07T00:00:00+00:00",
                "device": {"cpu": "test"},
                "versions": {},
                "intervals": {"eager": {"accuracy": iv}},
            }
        )
    )
    return path


def _nested(n, bf16, ptq, qat):
    return {
        "bf16": [i < bf16 for i in range(n)],
        "ptq": [i < ptq for i in range(n)],
        "qat": [i < qat for i in range(n)],
    }


def test_pool_reads_the_answers_the_accuracy_bench_keeps(tmp_path):
    # recoveries 1/2, 1 and 3/4 over 40 questions each; pooled counts 24, 0 and 18 of 120: (18 - 0) / 24 = 3/4
    groups = [_nested(40, 8, 0, 4), _nested(40, 8, 0, 8), _nested(40, 8, 0, 6)]
    files = [_result(tmp_path / f"s{s}.json", s, g) for s, g in zip((42, 1, 2), groups)]
    table = P.pool([json.loads(f.read_text()) for f in files])["eager"]["accuracy"]
    assert table["per_seed"] == [0.5, 1.0, 0.75]
    assert table["mean_of_seeds"] == pytest.approx(0.75)
    assert table["pooled"]["point"] == pytest.approx(0.75) and table["correct"] == {"bf16": 24, "ptq": 0, "qat": 18}
    assert table["n"] == 120


def test_pool_refuses_files_without_answers_and_repeated_seeds(tmp_path, monkeypatch):
    old = _result(tmp_path / "old.json", 42, _nested(10, 5, 0, 3))
    data = json.loads(old.read_text())
    del data["intervals"]["eager"]["accuracy"]["answers"]
    old.write_text(json.dumps(data))
    new = _result(tmp_path / "new.json", 42, _nested(10, 5, 0, 3))
    for argv, msg in (([str(old), str(new)], "no per-question answers"), ([str(new), str(new)], "repeat a seed")):
        monkeypatch.setattr(sys, "argv", ["seed_pool.py", *argv])
        with pytest.raises(SystemExit, match=msg):
            P.main()
