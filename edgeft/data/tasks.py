"""``builtin:tasks``: a deterministic instruction dataset with exact answers.

Seeded generators for multi-digit arithmetic, calendar questions (date offsets and weekdays) and unit
conversion. Train and test splits come from different seeds and share no prompt, so exact-match accuracy
on the test split measures what fine-tuning taught rather than memorisation. Python's ``random.Random``
with an integer seed is stable across platforms and versions, and every answer is computed exactly
(integers, ``datetime``, ``Decimal``). :func:`multiple_choice` gives the same rows with seeded distractors.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any

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


# --- multiple choice --------------------------------------------------------------------------------------
# The same test questions with the exact answer among three plausible wrong answers of the same kind, for
# log-likelihood scoring: numbers with one digit off by one, neighbouring and other weekdays, dates a day off or
# counted the wrong way, conversions with the decimal point slipped or the factor inverted. Everything is seeded
# by the question itself, so a row's choices and their order never depend on which other rows are asked.

MC_SEED = 4242
_ARITH = re.compile(r"What is (-?\d+) ([-+*]) (\d+)\?")
_DATE = re.compile(r"What is the date (\d+) days (after|before) (\d{4}-\d{2}-\d{2})\?")
_CONVERT = re.compile(r"Convert ([\d.]+) (\w+) to (\w+)\.")


def _digit_neighbours(n: int) -> list[str]:
    """``n`` with one digit changed by ±1 (no new leading zero), the slips of column arithmetic."""
    sign, digits = ("-" if n < 0 else ""), str(abs(n))
    out = []
    for i, d in enumerate(digits):
        for step in (-1, 1):
            v = int(d) + step
            if 0 <= v <= 9 and not (i == 0 and v == 0 and len(digits) > 1):
                out.append(sign + digits[:i] + str(v) + digits[i + 1 :])
    return out


def _exact_decimal(f: Fraction) -> str | None:
    """A fraction as a short decimal string, or None when it does not terminate within 6 places."""
    d = Decimal(f.numerator) / Decimal(f.denominator)
    if Fraction(d) != f or d != d.quantize(Decimal("0.000001")):
        return None
    return _fmt_decimal(d)


def _distractor_pool(row: dict[str, str], rng: random.Random) -> list[str]:
    q, a = row["question"], row["answer"]
    if a in _WEEKDAYS:
        i = _WEEKDAYS.index(a)
        others = [d for d in _WEEKDAYS if d != a and d not in (_WEEKDAYS[i - 1], _WEEKDAYS[(i + 1) % 7])]
        return [_WEEKDAYS[i - 1], _WEEKDAYS[(i + 1) % 7], rng.choice(others)]
    m = _DATE.match(q)
    if m:
        n, way, start = int(m.group(1)), m.group(2), dt.date.fromisoformat(m.group(3))
        ans = dt.date.fromisoformat(a)
        wrong_way = start - dt.timedelta(days=n) if way == "after" else start + dt.timedelta(days=n)
        off = [(ans + dt.timedelta(days=s)).isoformat() for s in (-1, 1)]
        rng.shuffle(off)
        shifted = []
        for months in (-1, 1):
            y, mo = divmod(ans.year * 12 + ans.month - 1 + months, 12)
            try:
                shifted.append(ans.replace(year=y, month=mo + 1).isoformat())
            except ValueError:  # no such day in that month
                pass
        rng.shuffle(shifted)
        return [off[0], wrong_way.isoformat(), *shifted, off[1]]
    m = _CONVERT.match(q)
    if m:
        value, src, dst = Fraction(m.group(1)), m.group(2), m.group(3)
        factor = next(Fraction(f) for s, d, f in _UNITS if (s, d) == (src, dst))
        result = Fraction(a)
        cands = [result * 10, result / 10, value / factor, value, result * 100, result / 100]
        pool = [s for s in (_exact_decimal(c) for c in cands) if s is not None]
        first = pool[:3]
        rng.shuffle(first)
        return first + pool[3:]
    if _ARITH.match(q):
        pool = _digit_neighbours(int(a))
        rng.shuffle(pool)
        return pool
    raise ValueError(f"no distractors for question {q!r}")


def with_choices(row: dict[str, str], n_choices: int = 4) -> dict[str, Any]:
    """A task row as a multiple-choice item: ``choices`` (the answer among ``n_choices - 1`` distractors, in a
    seeded order) and ``label``, the answer's index."""
    rng = random.Random(f"{MC_SEED}:{row['question']}")  # str seeds hash with SHA-512: stable everywhere
    wrong: list[str] = []
    for d in _distractor_pool(row, rng):
        if d != row["answer"] and d not in wrong:
            wrong.append(d)
    if len(wrong) < n_choices - 1:
        raise ValueError(f"only {len(wrong)} distractors for question {row['question']!r}")
    choices = [row["answer"], *wrong[: n_choices - 1]]
    rng.shuffle(choices)
    return {**row, "choices": choices, "label": choices.index(row["answer"])}


def multiple_choice(split: str, n_choices: int = 4) -> list[dict[str, Any]]:
    """The split's rows as multiple-choice items (see :func:`with_choices`); same output on every call."""
    return [with_choices(r, n_choices) for r in generate(split)]
