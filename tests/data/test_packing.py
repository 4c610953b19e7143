"""Padding-free and packed batches: no example's loss changes, nothing leaks across examples, bins are valid."""

import random

import pytest
import torch
import torch.nn.functional as F

from edgeft.arch import kernel_specs
from edgeft.data import (
    IGNORE_INDEX,
    Batcher,
    collate,
    collate_flat,
    encode_dataset,
    load_conversations,
    pack,
    pack_documents,
    sequences,
)
from edgeft.data.batching import packing_efficiency
from edgeft.models import load_model, resolve_model
from edgeft.training import lm_loss_sum

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
    rows[0] = {
        "input_ids": [t if i == 0 else (t * 7 + 13) % 8000 for i, t in enumerate(rows[0]["input_ids"])],
        "labels": rows[0]["labels"],
    }
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


# --- raw-text documents packed into full rows (continued pretraining) ------------------------------------------


@pytest.mark.parametrize("L", [2, 3, 7, 16, 64])
def test_documents_pack_into_full_rows_and_every_token_is_a_target_once(L):
    from collections import Counter

    rng = random.Random(L)
    lengths = [rng.choice([1, 2, 3, L - 1, L, L + 1, 2 * L + 5, rng.randint(1, 5 * L)]) for _ in range(40)]
    docs = [[10000 * (d + 1) + i for i in range(n)] for d, n in enumerate(lengths)]  # every id distinct
    rows = pack_documents(docs, L)
    assert all(len(r["input_ids"]) == L for r in rows[:-1]) and 2 <= len(rows[-1]["input_ids"]) <= L
    assert sum(len(r["input_ids"]) for r in rows) <= sum(lengths) + len(rows) - 1  # at most one repeat per row
    for r in rows:
        assert len(r["labels"]) == len(r["position_ids"]) == len(r["input_ids"])
        for t, lab, p in zip(r["input_ids"], r["labels"], r["position_ids"]):
            assert lab == (IGNORE_INDEX if p == 0 else t)
    targets = Counter(t for r in rows for t in r["labels"] if t != IGNORE_INDEX)
    want = Counter(t for d in docs for t in d[1:])  # every token but a document's first, which nothing precedes
    assert targets == want and max(targets.values()) == 1
    # each sequence of a row is a contiguous piece of one document, and a piece continued from the previous row
    # starts with the token that ended that row (its context)
    for k, r in enumerate(rows):
        for j, s in enumerate(seq["input_ids"] for seq in sequences(r)):
            d, i = divmod(s[0], 10000)
            assert s == docs[d - 1][i : i + len(s)]
            if i > 0:  # a continuation: the previous row ended with the same token
                assert k > 0 and j == 0 and rows[k - 1]["input_ids"][-1] == s[0]


def test_text_rows_are_documents_with_eos_between_them():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))  # adds BOS to plain text
    texts = ["The quick brown fox jumps over the lazy dog. " * n for n in (1, 9, 3, 14, 2)]
    rows = encode_dataset(tok, texts, max_length=48)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    assert all(d[0] == tok.bos_token_id and d.count(tok.eos_token_id) == 1 for d in docs)
    assert all(len(r["input_ids"]) == 48 for r in rows[:-1])
    # the stream: the rows' sequences, a continued piece without its repeated first token, is the documents joined
    stream = []
    for r in rows:
        for s in sequences(r):
            ids = s["input_ids"]
            stream += ids if ids[0] == tok.bos_token_id else ids[1:]
    assert stream == [t for d in docs for t in d]
    assert sum(lab != IGNORE_INDEX for r in rows for lab in r["labels"]) == sum(len(d) - 1 for d in docs)


TEXTS = ["The river bends twice before the old mill, where the water slows. " * n for n in (3, 1, 5, 2, 4)]


@pytest.mark.parametrize("kernels", [False, True])
def test_packed_text_rows_train_each_document_as_if_alone(tiny, kernels):
    """Per-token losses of packed text rows equal each document piece's losses computed alone: attention never
    crosses a document boundary (transformers' mask from the positions, or edgeft's varlen attention), in the
    flattened and the padded layouts."""
    model, tok, _ = tiny
    rows = encode_dataset(tok, TEXTS, max_length=40)
    assert len(rows) >= 4 and all(r["position_ids"].count(0) >= 1 for r in rows)
    assert any(r["position_ids"].count(0) >= 2 for r in rows[:3])  # rows that hold several documents
    rows = rows[:3]
    pieces = [seq for r in rows for seq in sequences(r)]
    alone = [float(lm_loss_sum(model, collate([p], tok.pad_token_id))[0]) for p in pieces]  # the eager reference
    padded_total, padded_n = lm_loss_sum(model, collate(rows, tok.pad_token_id))
    per_token = _token_losses(model, collate_flat(rows))
    if kernels:  # edgeft's varlen attention (CPU: SDPA with a block-diagonal mask) and fused loss
        kmod = pytest.importorskip("edgeft.kernels")
        kmod.patch(model, KERNELS, rms_norm=False, rope=False, glu=False, lora=False)  # interpreted Triton: slow
    try:
        flat_total, flat_n = lm_loss_sum(model, collate_flat(rows))
    finally:
        if kernels:
            kmod.unpatch(model)
    n_targets = sum(lab != IGNORE_INDEX for r in rows for lab in r["labels"])
    assert int(flat_n) == int(padded_n) == n_targets
    assert float(flat_total) == pytest.approx(sum(alone), rel=1e-5)
    assert float(padded_total) == pytest.approx(sum(alone), rel=1e-5)
    if not kernels:
        start = 0
        for p, ref in zip(pieces, alone):
            k = len(p["input_ids"])
            assert float(per_token[start : start + k - 1].sum()) == pytest.approx(ref, rel=1e-5, abs=1e-4)
            start += k


def test_no_contamination_across_packed_documents(tiny):
    """Changing one document's tokens leaves the per-token losses of the other documents in its row unchanged."""
    model, tok, _ = tiny
    rows = encode_dataset(tok, TEXTS, max_length=40)
    row = next(r for r in rows if r["position_ids"].count(0) >= 2)
    first = len(sequences(row)[0]["input_ids"])
    base = _token_losses(model, collate_flat([row]))
    changed_ids = [(t * 7 + 13) % 8000 if 0 < i < first else t for i, t in enumerate(row["input_ids"])]
    changed = _token_losses(model, collate_flat([dict(row, input_ids=changed_ids)]))
    torch.testing.assert_close(changed[first - 1 :], base[first - 1 :], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[: first - 1], base[: first - 1])
    # the same row with positions that do not restart (one sequence): the later document now sees the first
    crossed = _token_losses(model, {**collate_flat([row]), "position_ids": torch.arange(len(row["input_ids"]))[None]})
    assert not torch.allclose(crossed[first:], base[first:], rtol=1e-3, atol=1e-3)
