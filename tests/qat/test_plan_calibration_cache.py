"""The device-fit calibration's cache (edgeft.qat.plan ``calibrate``/``calibration_key``): a second calibration of
the same model, batches and settings is read back identical without measuring again; a changed weight, token or
group size misses; a corrupt entry is recomputed; a failed or killed write leaves no partial file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qat_helpers import tiny_model

from edgeft.qat import plan as fit
from edgeft.qat import sensitivity
from edgeft.qat.schemes import resolve

SIZES = (32, 64)


def _model(seed: int = 0, tie: bool = True):
    # group-64 friendly sizes: SIZES holds 64
    return tiny_model("llama", False, seed, intermediate_size=128, vocab_size=128, tie_word_embeddings=tie).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return [{"input_ids": ids, "labels": labels, "attention_mask": mask}]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))
    return tmp_path / "calibration"


@pytest.fixture
def measured(monkeypatch) -> list[int]:
    """Counts linear_sensitivity's calls (calibrate imports it from the module at call time)."""
    calls: list[int] = []
    real = sensitivity.linear_sensitivity

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(sensitivity, "linear_sensitivity", counting)
    return calls


def test_second_calibration_is_reused(cache, monkeypatch):
    batches = _batches()
    real = sensitivity.linear_sensitivity
    first = fit.calibrate(_model(), batches, group_sizes=SIZES)
    assert first["cache"] == "computed" and len(first["digest"]) == 64
    # what was computed is linear_sensitivity's own answer, unchanged by caching
    direct = sensitivity.linear_sensitivity(_model(), batches, resolve(fit.BASE_PRESET, weight_scale="absmax"), SIZES)
    assert first["sensitivity"] == direct["sensitivity"] and first["float_loss"] == direct["float_loss"]
    assert [p.name for p in cache.iterdir()] == [first["digest"] + ".json"]

    def fail(*a, **kw):
        raise AssertionError("measured again")

    monkeypatch.setattr(sensitivity, "linear_sensitivity", fail)
    model = _model()  # another model object, tied head, the same bytes
    again = fit.calibrate(model, batches, group_sizes=SIZES)
    assert again["cache"] == "reused" and again["digest"] == first["digest"]
    assert again["sensitivity"] == first["sensitivity"]  # bit for bit, int group-size keys kept
    assert {k: again[k] for k in ("float_loss", "tokens", "seconds", "group_sizes")} == {
        k: first[k] for k in ("float_loss", "tokens", "seconds", "group_sizes")
    }
    # the same object again (calibrate untied its head): the same key
    assert fit.calibrate(model, batches, group_sizes=SIZES)["cache"] == "reused"
    # two budgets of one fine-tune (group size 32 fixed: another key): the second plan's file says the calibration
    # was reused, under which digest, and what it had cost
    monkeypatch.setattr(sensitivity, "linear_sensitivity", real)
    one = fit.plan_for_model(_model(), batches, fit.Budget(max_size_mb=1.0), None, group_size=32)
    monkeypatch.setattr(sensitivity, "linear_sensitivity", fail)
    two = fit.plan_for_model(_model(), batches, fit.Budget(max_size_mb=0.25), None, group_size=32)
    info = fit.FitPlan.from_dict(json.loads(json.dumps(two.to_dict()))).calibration
    assert one.calibration["cache"] == "computed" and info["cache"] == "reused"
    assert info["digest"] == one.calibration["digest"] != first["digest"]
    assert info["seconds"] == one.calibration["seconds"] and info["sensitivity"] == one.calibration["sensitivity"]


def test_changed_inputs_miss(cache, measured):
    batches = _batches()
    base = fit.calibrate(_model(), batches, group_sizes=SIZES)
    assert len(measured) == 1

    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    changed = fit.calibrate(model, batches, group_sizes=SIZES)
    assert changed["cache"] == "computed" and changed["digest"] != base["digest"]

    other = _batches()
    other[0]["input_ids"][1, 9] = (int(other[0]["input_ids"][1, 9]) + 1) % 128
    assert fit.calibrate(_model(), other, group_sizes=SIZES)["cache"] == "computed"
    assert fit.calibrate(_model(), batches, group_sizes=(32,))["cache"] == "computed"
    assert len(measured) == 4 and len(list(cache.iterdir())) == 4

    # the key alone: the labels, the weight scale, the dtype (bf16 hashed as bytes) each change it
    key = fit.calibration_key(_model(), batches, "absmax", SIZES)
    assert key == base["digest"]
    relabel = _batches()
    relabel[0]["labels"][0, 6] = -100
    assert fit.calibration_key(_model(), relabel, "absmax", SIZES) != key
    assert fit.calibration_key(_model(), batches, "mse", SIZES) != key
    assert fit.calibration_key(_model().to(torch.bfloat16), batches, "absmax", SIZES) != key


def test_corrupt_entry_is_recomputed(cache, measured):
    batches = _batches()
    first = fit.calibrate(_model(), batches, group_sizes=SIZES)
    path = cache / f"{first['digest']}.json"
    good = path.read_text()
    for bad in (good[: len(good) // 2], "[]", good.replace('"float_loss"', '"floatloss"'), "\x00\xff"):
        path.write_text(bad)
        r = fit.calibrate(_model(), batches, group_sizes=SIZES)
        assert r["cache"] == "computed" and r["sensitivity"] == first["sensitivity"]
        assert json.loads(path.read_text())["digest"] == first["digest"]  # rewritten whole
    assert len(measured) == 5


def test_no_partial_file(cache, monkeypatch):
    batches = _batches()
    real = Path.write_text

    def half_then_full_disk(self, text, *a, **kw):
        real(self, text[: len(text) // 2], *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    r = fit.calibrate(_model(), batches, group_sizes=SIZES)  # the plan still gets its calibration
    assert r["cache"] == "computed"
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(Path, "write_text", real)

    # a killed writer's temporary file (its pid gone) is removed by the next write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    debris = cache / f".{r['digest']}.json.tmp-{int(dead.stdout)}-x1"
    debris.write_text('{"version": 1, "dig')
    fit.calibrate(_model(seed=1), batches, group_sizes=SIZES)
    fit.calibrate(_model(), batches, group_sizes=SIZES)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and all(n.endswith(".json") and not n.startswith(".") for n in names)
    for p in cache.iterdir():
        assert json.loads(p.read_text())["digest"] == p.stem


def test_an_entry_from_before_embeddings_were_measured_gains_them(cache, monkeypatch):
    """A cached calibration without the embedding's rises (written before they were measured) keeps its linears
    (no linear measured again) and gets the embedding's rises added, the same as a fresh calibration's."""
    batches = _batches()
    first = fit.calibrate(_model(), batches, group_sizes=SIZES)
    assert set(first["embedding"]) == {"int8", "int4"}
    path = cache / (first["digest"] + ".json")
    entry = json.loads(path.read_text())
    del entry["result"]["embedding"]
    path.write_text(json.dumps(entry))

    def fail(*a, **kw):
        raise AssertionError("measured again")

    monkeypatch.setattr(sensitivity, "linear_sensitivity", fail)
    again = fit.calibrate(_model(), batches, group_sizes=SIZES)
    assert again["cache"] == "reused" and again["sensitivity"] == first["sensitivity"]
    assert again["embedding"] == pytest.approx(first["embedding"], abs=1e-6)
    assert "embedding" in json.loads(path.read_text())["result"]  # written back: the next run reads it
    assert fit.calibrate(_model(), batches, group_sizes=SIZES)["embedding"] == again["embedding"]
