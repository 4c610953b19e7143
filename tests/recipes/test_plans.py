"""The training plans: which runs, in which order, on which data, from which twin (the order fixes the random
draws of each run, so it is part of the behaviour)."""

from __future__ import annotations

import pytest

from edgeft import recipes
from edgeft.config import TrainConfig, resolve
from edgeft.rundir import RunDir, Variant
from edgeft.training.distill import corpus_examples


@pytest.fixture(scope="module")
def data():
    from transformers import AutoTokenizer

    from edgeft.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    train_ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]} for _ in range(9)]
    return (tok, {"name": "t"}, train_ex, [])


def _plan(cfg: TrainConfig, data):
    cfg = resolve(cfg)
    calls = []

    def train(root, d, qat, twin=None):
        calls.append((root, qat, twin, len(d[2])))

    recipes.choose(cfg).run(cfg, RunDir("r"), data, train)
    return recipes.choose(cfg).__name__.rsplit(".", 1)[-1], calls


def test_default_qat_recipe_trains_the_twin_then_qat_from_it_on_data_and_prose(data):
    prose = corpus_examples(data[0], 0.25, 9, seed=42)
    assert len(prose) == 3  # 25% of the mixed examples
    name, calls = _plan(TrainConfig(model="tiny-llama", qat="int8-int4"), data)
    assert name == "twin_qat"
    assert calls == [(Variant("r/baseline"), False, None, 9), (RunDir("r"), True, Variant("r/baseline"), 12)]


def test_finetune_plans(data):
    assert _plan(TrainConfig(model="tiny-llama"), data) == ("finetune", [(RunDir("r"), False, None, 9)])
    assert _plan(TrainConfig(model="tiny-llama", qat="int8-int4", ptq=False), data) == (
        "finetune",
        [(RunDir("r"), True, None, 9)],
    )
    # a baseline that the QAT run learns nothing from trains after it, on the data alone
    name, calls = _plan(
        TrainConfig(model="tiny-llama", qat="int8-int4", qat_distill=0.0, qat_init="pretrained", qat_corpus=0.25), data
    )
    assert name == "finetune"
    assert calls == [(RunDir("r"), True, None, 12), (Variant("r/baseline"), False, None, 9)]
    # starting from the twin without distilling is still the twin plan
    assert _plan(TrainConfig(model="tiny-llama", qat="int8-int4", qat_distill=0.0), data)[0] == "twin_qat"


def test_prose_fits_short_rows_so_packing_accepts_it(data):
    """--max-seq-length below the prose's 128-token chunks: the mixed-in prose follows the rows' length (packing
    raised "example longer than the bin" before)."""
    from edgeft.data.batching import Batcher
    from edgeft.recipes.common import with_prose

    cfg = resolve(TrainConfig(model="tiny-llama", qat="int8-int4", max_seq_length=48, packing=True))
    mixed = with_prose(cfg, data)[2]
    prose = mixed[len(data[2]) :]
    assert prose, "the default QAT run mixes prose in"
    assert max(len(ex["input_ids"]) for ex in prose) == 48
    assert len(Batcher(mixed, "packed", 0, 48)) >= 1
