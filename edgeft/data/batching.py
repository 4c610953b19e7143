"""Batches without wasted compute: padded, padding-free (flattened) and packed.

- padded: rows right-padded to the longest; pads carry no label and no attention (the classic layout).
- padding-free (the default): the micro-batch's examples are concatenated into one row with ``position_ids`` that
  restart at 0 for every example and no attention mask. transformers then builds a block-diagonal causal mask from
  the restarting positions (its SDPA/eager path; ``use_cache=False`` is required, else it skips the detection), and
  edgeft's kernels turn them into ``cu_seqlens`` for varlen attention on GPU. No FLOP is spent on padding and each
  example's loss is exactly what it is alone.
- packed: examples are first grouped into bins of at most max_seq_length tokens (first-fit decreasing), and a
  micro-batch is ``batch_size`` bins, flattened the same way, so attention never crosses examples.

In the flattened layouts the first label of every example is masked, so no position learns to predict the next
example's first token across a boundary (the shifted loss sees each example exactly as in isolation).

An example may itself hold several sequences (raw-text rows packed from documents, ``encode.pack_documents``): its
own ``position_ids`` restart at 0 where each starts. The flattened layouts keep those positions (and mask the label
at every start); the padded layout gives each sequence its own padded row, since a padding mask alone would let them
attend to each other.
"""

from __future__ import annotations

import random
from typing import Any

from .encode import IGNORE_INDEX

BATCHING = ("padding_free", "packed", "padded")


def _starts(ex: dict[str, list[int]]) -> list[int]:
    """Where the example's sequences start: every position 0 of its ``position_ids`` (just 0 without them)."""
    pos = ex.get("position_ids")
    return [0] if pos is None else [i for i, p in enumerate(pos) if p == 0]


def sequences(ex: dict[str, list[int]]) -> list[dict[str, list[int]]]:
    """The sequences of one example as examples of their own (itself when it holds one)."""
    starts = _starts(ex)
    if len(starts) == 1:
        return [{"input_ids": ex["input_ids"], "labels": ex["labels"]}]
    bounds = starts + [len(ex["input_ids"])]
    return [
        {"input_ids": ex["input_ids"][a:b], "labels": [IGNORE_INDEX, *ex["labels"][a + 1 : b]]}
        for a, b in zip(bounds, bounds[1:])
    ]


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest row; padded positions carry no label and no attention. An example holding
    several sequences (``position_ids``) gives one row per sequence."""
    import torch

    batch = [seq for ex in batch for seq in sequences(ex)]
    n = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        ids[i, :k] = torch.tensor(ex["input_ids"])
        labels[i, :k] = torch.tensor(ex["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_flat(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Concatenate examples into one row (1, T) with restarting ``position_ids`` and no attention mask; the label
    at every sequence start is masked."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in batch:
        p = ex.get("position_ids") or range(len(ex["input_ids"]))
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX if q == 0 else t for q, t in zip(p, ex["labels"])]
        pos += p
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
    }


def pack(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into bins of at most ``capacity`` tokens (first-fit decreasing), bins shuffled.

    Ties in length keep a seeded random order so that the same data packs the same way on every run.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths stay shuffled
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the bin capacity {capacity}")
        for b, free in enumerate(room):  # first fit; rows are few enough that a linear scan is fine
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    rng.shuffle(bins)
    return bins


def packing_efficiency(lengths: list[int], bins: list[list[int]], capacity: int) -> float:
    """Share of valid tokens in the packed rows (1.0: no padding would be needed at all)."""
    return sum(lengths) / max(1, len(bins) * capacity)


def padding_efficiency(lengths: list[int], batch_size: int) -> float:
    """Share of valid tokens a padded layout would have in consecutive batches of ``batch_size`` (for the log)."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return total / max(1, padded)


class Batcher:
    """Turns training units (examples or packed bins) into micro-batches of the chosen layout."""

    def __init__(
        self,
        examples: list[dict[str, list[int]]],
        batching: str,
        pad_id: int,
        max_seq_length: int | None = None,
        seed: int = 0,
    ) -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, not {batching!r}")
        self.examples = examples
        self.batching = batching
        self.pad_id = pad_id
        lengths = [len(ex["input_ids"]) for ex in examples]
        if batching == "packed":
            cap = max_seq_length or max(lengths)
            self.units = pack(lengths, cap, seed)
            self.efficiency = packing_efficiency(lengths, self.units, cap)
        else:
            self.units = [[i] for i in range(len(examples))]
            self.efficiency = 1.0 if batching == "padding_free" else padding_efficiency(lengths, 1)

    def __len__(self) -> int:
        return len(self.units)

    def collate(self, unit_ids: list[int]) -> dict[str, Any]:
        rows = [self.examples[i] for u in unit_ids for i in self.units[u]]
        return collate(rows, self.pad_id) if self.batching == "padded" else collate_flat(rows)
