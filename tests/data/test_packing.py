"""Padding-free and packed batches: no example's loss changes, nothing leaks across examples, bins are valid."""

import random

import pytest
import torch
import torch.nn.functional as F

from edgeft.arch import kernel_specs
from edgeft.data import IGNORE_INDEX, Batcher, collate, collate_flat, encode_dataset, load_conversations, pack
from edgeft.data.batching import packing_efficiency
from edgeft.models import load_model, resolve_model
from edgeft.train import lm_loss_sum

KERNELS = kernel_specs()


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model(resolve_model("tiny-llama"))
    examples = encode_dataset(tok, load_conversations("builtin:tasks")[:12], 128)
    return model, tok, examples


def _token_losses(model, batch):
    """Independent reference: per-position next-token losses from the model's logits."""
    kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits[0, :-1].float()
    return F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def test_pack_bins_hold_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(5, 100) for _ in range(200)]
    bins = pack(lengths, 128, seed=1)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert bins == pack(lengths, 128, seed=1)
    eff = packing_efficiency(lengths, bins, 128)
    assert eff == sum(lengths) / (len(bins) * 128) and eff > 0.9  # first-fit decreasing packs tightly
    with pytest.raises(ValueError):
        pack([200], 128)


def test_flat_collate_restarts_positions_and_masks_boundaries():
    b = collate_flat([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 8 is never the target of 7
    assert "attention_mask" not in b


@pytest.mark.parametrize("kernels", [False, True])
def test_packing_does_not_change_any_examples_loss(tiny, kernels):
    model, tok, examples = tiny
    rows = examples[:6]
    if kernels:  # edgeft's varlen attention path (CPU: SDPA with a block-diagonal mask) and fused loss
        kmod = pytest.importorskip("edgeft.kernels")
        # interpreted Triton is slow on CPU
        kmod.patch(model, KERNELS, rms_norm=False, rope=False, glu=False, lora=False)
    try:
        alone = [float(lm_loss_sum(model, collate([ex], tok.pad_token_id))[0]) for ex in rows]
        packed = collate_flat(rows)
        per_token = _token_losses(model, packed) if not kernels else None
        total, n = lm_loss_sum(model, packed)
        padded_total, padded_n = lm_loss_sum(model, collate(rows, tok.pad_token_id))
    finally:
        if kernels:
            kmod.unpatch(model)
    assert float(total) == pytest.approx(sum(alone), rel=1e-5) == pytest.approx(float(padded_total), rel=1e-5)
    assert int(n) == int(padded_n)
    if per_token is not None:
        start = 0
        for ex, ref in zip(rows, alone):  # each example's own loss, read out of the packed row
            k = len(ex["input_ids"])
            got = float(per_token[start : start + k - 1].sum())  # its k-1 predictions; the next starts a new doc
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-4)
            start += k


def test_no_contamination_across_packed_examples(tiny):
    """Changing one example's tokens leaves every other example's per-token losses unchanged."""
    model, _, examples = tiny
    rows = [dict(ex) for ex in examples[:3]]
    base = _token_losses(model, collate_flat(rows))
    rows[0] = {"input_ids": [t if i == 0 else (t * 7 + 13) % 8000 for i, t in enumerate(rows[0]["input_ids"])],
               "labels": rows[0]["labels"]}
    changed = _token_losses(model, collate_flat(rows))
    k = len(rows[0]["input_ids"])
    torch.testing.assert_close(changed[k - 1 :], base[k - 1 :], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[: k - 1], base[: k - 1])


def test_batcher_layouts(tiny):
    _, tok, examples = tiny
    lengths = [len(ex["input_ids"]) for ex in examples]
    packed = Batcher(examples, "packed", tok.pad_token_id, max_seq_length=128, seed=0)
    assert len(packed) < len(examples) and packed.efficiency == pytest.approx(sum(lengths) / (len(packed) * 128))
    b = packed.collate([0, 1])
    assert b["input_ids"].shape[1] == sum(lengths[i] for u in (0, 1) for i in packed.units[u])
    flat = Batcher(examples, "padding_free", tok.pad_token_id)
    assert len(flat) == len(examples) and flat.collate([3])["input_ids"].tolist()[0] == examples[3]["input_ids"]
    padded = Batcher(examples, "padded", tok.pad_token_id).collate([0, 1])
    assert padded["input_ids"].shape == (2, max(lengths[:2]))
