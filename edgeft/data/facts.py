"""``builtin:facts``: a second task set, factual questions generated from public structured data.

Independent of ``builtin:tasks`` (arithmetic, dates, units): seven kinds of question, all with one exact answer,
generated from pinned PyPI packages' data (see :mod:`.fetch`), never from their code (nothing is imported or run):

- chemical elements (``periodictable`` 2.1.0, public domain: its ``element_base`` table, read as a literal):
  symbol from name, atomic number from name, name from symbol;
- ISO 3166-1 countries: alpha-2 and alpha-3 code from name; ISO 4217 currencies: code from name; ISO 639-1
  languages: code from name (``pycountry`` 26.2.16's JSON databases, from Debian's iso-codes; LGPL-2.1).

The split is by entity: each element, country, currency or language is asked about in one split only (the first
:data:`TEST_PER_FAMILY` of each family in sha256 order are the test split's), so fine-tuning on ``train`` teaches the
answer format, never a test answer. Rows have ``builtin:tasks``' record format (``task``, ``question``, ``answer``;
:func:`multiple_choice` adds ``choices`` and ``label``) and its chat form (:func:`edgeft.data.tasks.to_messages`);
the test split interleaves the kinds, so its first ``n`` rows stay balanced.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import zipfile
from typing import Any

from edgeft.errors import EdgeftError

from .fetch import Source, fetch, fetch_all

NAME = "builtin:facts"
TEST_PER_FAMILY = 50  # entities per family in the test split: 50 questions of each kind
MC_SEED = 7311
SOURCES = {
    "periodictable": Source(
        "pypi",
        "periodictable",
        "2.1.0",
        "periodictable-2.1.0-py3-none-any.whl",
        "e9155d2bf5ac10050abeff2f99096d4f04312c0c8a6bb432e28744367c5064b3",
        "public domain",
    ),
    "pycountry": Source(
        "pypi",
        "pycountry",
        "26.2.16",
        "pycountry-26.2.16-py3-none-any.whl",
        "115c4baf7cceaa30f59a4694d79483c9167dbce7a9de4d3d571c5f3ea77c305a",
        "LGPL-2.1 (ISO data from Debian's iso-codes)",
    ),
}
KINDS = (
    "element_symbol",
    "element_number",
    "element_name",
    "country_alpha2",
    "country_alpha3",
    "currency_code",
    "language_code",
)


@functools.lru_cache(maxsize=1)
def tables() -> dict[str, list[dict[str, Any]]]:
    """The source tables: ``elements`` (number, name, symbol), ``countries`` (name, alpha_2, alpha_3),
    ``currencies`` (name, code), ``languages`` (name, code)."""
    fetch_all(SOURCES.values(), "builtin:facts")
    with zipfile.ZipFile(fetch(SOURCES["periodictable"])) as zf:
        tree = ast.parse(zf.read("periodictable/core.py").decode("utf-8"))
    base = next(
        (
            n.value
            for n in tree.body
            if isinstance(n, ast.AnnAssign | ast.Assign)
            and any(
                getattr(t, "id", None) == "element_base"
                for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets)
            )
        ),
        None,
    )
    if base is None:
        raise EdgeftError("periodictable/core.py has no element_base table")
    elements = [
        {"number": z, "name": v[0], "symbol": v[1]} for z, v in sorted(ast.literal_eval(base).items()) if 1 <= z <= 118
    ]
    with zipfile.ZipFile(fetch(SOURCES["pycountry"])) as zf:

        def db(name: str, key: str) -> list[dict[str, str]]:
            return json.loads(zf.read(f"pycountry/databases/{name}.json"))[key]

        countries = [
            {"name": c.get("common_name", c["name"]), "alpha_2": c["alpha_2"], "alpha_3": c["alpha_3"]}
            for c in db("iso3166-1", "3166-1")
        ]
        # X.. codes are funds, metals and test codes, not a country's money
        currencies = [
            {"name": c["name"], "code": c["alpha_3"]} for c in db("iso4217", "4217") if not c["alpha_3"].startswith("X")
        ]
        languages = [
            {"name": lang["name"], "code": lang["alpha_2"]} for lang in db("iso639-3", "639-3") if "alpha_2" in lang
        ]
    return {"elements": elements, "countries": countries, "currencies": currencies, "languages": languages}


def _questions(t: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str, str]]:
    """Every (kind, entity key, question, answer) whose question has one answer."""
    out = []
    for e in t["elements"]:
        key, name = f"element:{e['number']}", e["name"].lower()
        out += [
            ("element_symbol", key, f"What is the chemical symbol of {name}?", e["symbol"]),
            ("element_number", key, f"What is the atomic number of {name}?", str(e["number"])),
            ("element_name", key, f"Which chemical element has the symbol {e['symbol']}?", e["name"]),
        ]
    for c in t["countries"]:
        key = f"country:{c['alpha_3']}"
        out += [
            ("country_alpha2", key, f"What is the ISO 3166-1 alpha-2 code of {c['name']}?", c["alpha_2"]),
            ("country_alpha3", key, f"What is the ISO 3166-1 alpha-3 code of {c['name']}?", c["alpha_3"]),
        ]
    out += [
        ("currency_code", f"currency:{c['code']}", f"What is the ISO 4217 code of the currency {c['name']}?", c["code"])
        for c in t["currencies"]
    ]
    out += [
        (
            "language_code",
            f"language:{lang['code']}",
            f"What is the ISO 639-1 code of the {lang['name']} language?",
            lang["code"],
        )
        for lang in t["languages"]
    ]
    # a name that two entities share (two ISO 4217 codes are "Bolivar Soberano") has no single answer
    count: dict[str, int] = {}
    for _, _, q, _ in out:
        count[q] = count.get(q, 0) + 1
    return [x for x in out if count[x[2]] == 1]


def _h(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


@functools.lru_cache(maxsize=2)
def _split(split: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    qs = _questions(tables())
    families: dict[str, list[str]] = {}
    for _, key, _, _ in qs:
        fam = families.setdefault(key.split(":")[0], [])
        if key not in fam:
            fam.append(key)
    test_keys = {
        k for keys in families.values() for k in sorted(keys, key=lambda k: _h(f"facts:{k}"))[:TEST_PER_FAMILY]
    }
    by_kind: dict[str, list[tuple[str, str]]] = {k: [] for k in KINDS}
    for kind, key, q, a in sorted(qs, key=lambda x: _h(f"facts:{x[2]}")):
        if (key in test_keys) == (split == "test"):
            by_kind[kind].append((q, a))
    return tuple(tuple(v) for v in by_kind.values())


def generate(split: str) -> list[dict[str, str]]:
    """Rows ``{"task", "question", "answer"}`` of a split ("train" or "test"), kinds interleaved; same every call."""
    if split not in ("train", "test"):
        raise ValueError(f"{NAME} has splits ['test', 'train'], not {split!r}")
    per_kind = _split(split)
    rows = []
    for i in range(max(map(len, per_kind))):
        for kind, items in zip(KINDS, per_kind):
            if i < len(items):
                rows.append({"task": kind, "question": items[i][0], "answer": items[i][1]})
    return rows


def _distractor_pool(row: dict[str, str], rng: random.Random) -> list[str]:
    """Wrong answers of the same kind, the most confusable first: neighbouring elements, codes with the same
    first letter."""
    t, kind, a = tables(), row["task"], row["answer"]
    if kind.startswith("element"):
        by_num = {e["number"]: e for e in t["elements"]}
        field = {"element_symbol": "symbol", "element_number": "number", "element_name": "name"}[kind]
        z = next(e["number"] for e in t["elements"] if str(e[field]) == a)
        near = [by_num[n] for n in (z - 1, z + 1, z - 2, z + 2, z - 3, z + 3) if n in by_num]
        first, rest = near[:4], near[4:]
        rng.shuffle(first)
        return [str(e[field]) for e in first + rest]
    codes = {
        "country_alpha2": [c["alpha_2"] for c in t["countries"]],
        "country_alpha3": [c["alpha_3"] for c in t["countries"]],
        "currency_code": [c["code"] for c in t["currencies"]],
        "language_code": [lang["code"] for lang in t["languages"]],
    }[kind]
    same = sorted(c for c in set(codes) if c != a and c[0] == a[0])
    other = sorted(c for c in set(codes) if c != a and c[0] != a[0])
    rng.shuffle(same)
    rng.shuffle(other)
    return same + other


def with_choices(row: dict[str, str], n_choices: int = 4) -> dict[str, Any]:
    """A row as a multiple-choice item (``choices``, ``label``), seeded by the question alone."""
    rng = random.Random(f"{MC_SEED}:{row['question']}")
    wrong: list[str] = []
    for d in _distractor_pool(row, rng):
        if d != row["answer"] and d not in wrong:
            wrong.append(d)
    choices = [row["answer"], *wrong[: n_choices - 1]]
    rng.shuffle(choices)
    return {**row, "choices": choices, "label": choices.index(row["answer"])}


def multiple_choice(split: str, n_choices: int = 4) -> list[dict[str, Any]]:
    """The split's rows as multiple-choice items; same output on every call."""
    return [with_choices(r, n_choices) for r in generate(split)]
