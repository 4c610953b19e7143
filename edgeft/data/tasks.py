"""``builtin:tasks``: a deterministic instruction dataset with exact answers.

Seeded generators for multi-digit arithmetic, calendar questions (date offsets and weekdays) and unit
conversion. Train and test splits come from different seeds and share no prompt, so exact-match accuracy
on the test split measures what fine-tuning taught rather than memorisation. Python's ``random.Random``
with an integer seed is stable across platforms and versions, and every answer is computed exactly
(integers, ``datetime``, ``Decimal``).
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

SPLIT_SEEDS = {"train": 1234, "test": 98765}
SPLIT_SIZES = {"train": 4000, "test": 200}
INSTRUCTION = "Answer with the result only."

_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# (from unit, to unit, factor as a Decimal string): result = value * factor
_UNITS = [
    ("kilometers", "meters", "1000"),
    ("meters", "centimeters", "100"),
    ("kilograms", "grams", "1000"),
    ("liters", "milliliters", "1000"),
    ("hours", "minutes", "60"),
    ("minutes", "seconds", "60"),
    ("days", "hours", "24"),
    ("meters", "millimeters", "1000"),
    ("grams", "kilograms", "0.001"),
    ("minutes", "hours", "1/60"),  # only multiples of 15 minutes, so the result stays exact
    ("feet", "inches", "12"),
    ("yards", "feet", "3"),
]


def _fmt_decimal(d: Decimal) -> str:
    s = format(d.normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(12, 999), rng.randint(2, 99)
        return f"What is {a} * {b}?", str(a * b)
    a, b = rng.randint(100, 99999), rng.randint(10, 9999)
    if op == "-":
        return f"What is {a} - {b}?", str(a - b)
    return f"What is {a} + {b}?", str(a + b)


def _date(rng: random.Random) -> tuple[str, str]:
    start = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 40))
    if rng.random() < 0.5:
        return f"What day of the week was {start.isoformat()}?", _WEEKDAYS[start.weekday()]
    n = rng.randint(1, 400)
    if rng.random() < 0.5:
        return (
            f"What is the date {n} days after {start.isoformat()}? Use YYYY-MM-DD.",
            (start + dt.timedelta(days=n)).isoformat(),
        )
    return (
        f"What is the date {n} days before {start.isoformat()}? Use YYYY-MM-DD.",
        (start - dt.timedelta(days=n)).isoformat(),
    )


def _units(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(_UNITS)
    if (src, dst) == ("minutes", "hours"):
        value = Decimal(15 * rng.randint(1, 40))
        result = value / Decimal(60)
    else:
        # one decimal place at most, so every result is exact and short
        value = Decimal(rng.randint(1, 500)) / (Decimal(10) if rng.random() < 0.4 else Decimal(1))
        result = value * Decimal(factor)
    return f"Convert {_fmt_decimal(value)} {src} to {dst}.", _fmt_decimal(result)


_GENERATORS = [_arithmetic, _date, _units]


def generate(split: str) -> list[dict[str, str]]:
    """Rows ``{"task", "question", "answer"}`` of a split ("train" or "test"); same output on every call."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"builtin:tasks has splits {sorted(SPLIT_SEEDS)}, not {split!r}")
    exclude: set[str] = set()
    if split == "test":
        exclude = {r["question"] for r in generate("train")}
    rng = random.Random(SPLIT_SEEDS[split])
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < SPLIT_SIZES[split]:
        gen = _GENERATORS[len(rows) % len(_GENERATORS)]
        q, a = gen(rng)
        if q in seen or q in exclude:
            continue
        seen.add(q)
        rows.append({"task": gen.__name__.strip("_"), "question": q, "answer": a})
    return rows


def to_messages(row: dict[str, str]) -> list[dict[str, str]]:
    """The chat form used for training and evaluation."""
    return [
        {"role": "user", "content": f"{row['question']} {INSTRUCTION}"},
        {"role": "assistant", "content": row["answer"]},
    ]
