"""Model sources: built-in tiny models are deterministic HF directories; bad sources are one clear error."""

import hashlib
import json

import pytest

from edgeft.errors import EdgeftError
from edgeft.models import BUILTIN_MODELS, load_model, resolve_model


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "name,arch,tied",
    [
        ("tiny-llama", "LlamaForCausalLM", False),
        ("tiny-qwen3", "Qwen3ForCausalLM", True),
        ("tiny-gemma3", "Gemma3ForCausalLM", True),
    ],
)
def test_tiny_models_are_deterministic(tmp_path, monkeypatch, name, arch, tied):
    shared = resolve_model(name)
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))
    fresh = resolve_model(name)
    assert fresh != shared and fresh.is_relative_to(tmp_path)
    for f in ["model.safetensors", "tokenizer.json"]:
        assert _digest(fresh / f) == _digest(shared / f), f
    cfg = json.loads((fresh / "config.json").read_text())
    assert cfg["architectures"] == [arch] and cfg["tie_word_embeddings"] == tied
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (256, 4, 8192)
    model, tok = load_model(fresh)
    assert len(tok) == 8192 and tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert (tok("hi").input_ids[0] == tok.bos_token_id) == (name in ("tiny-llama", "tiny-gemma3"))
    if name == "tiny-gemma3":  # random (1 + w) norm weights, not HF's zeros; a window shorter than the tests' texts
        assert float(model.model.norm.weight.abs().mean()) > 0.01
        assert cfg["sliding_window"] == 16 and "full_attention" in cfg["layer_types"]
    assert not list(tmp_path.rglob(".*tmp-*")), "temporary directories left behind"


def test_unknown_and_malformed_sources(tmp_path):
    with pytest.raises(EdgeftError, match="unknown model 'nope'"):
        resolve_model("nope")
    with pytest.raises(EdgeftError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(EdgeftError, match="expected a Hugging Face directory or a .gguf file"):
        resolve_model(str(tmp_path / "w.bin"))


def test_builtin_registry_has_the_default():
    assert {"tiny-llama", "tiny-qwen3", "tiny-gemma3", "smollm2-135m"} <= set(BUILTIN_MODELS)
