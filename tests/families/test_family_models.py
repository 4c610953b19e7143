"""Each real family at tiny width: its released config keys, its real tokenizer and template, masking under that
template, the apps' prompt format and the GGUF tokenizer on llama.cpp, against independent references."""

import json

import pytest
from transformers import AutoTokenizer

from edgeft.data import IGNORE_INDEX, encode_conversation_examples
from edgeft.exporters import gguf
from edgeft.exporters.prompt_format import derive, fill
from edgeft.models import FAMILIES, load_model

from .conftest import NAMES, family_dir

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6 exactly"},
]
# What each family trains on for CONV, written from its released template by hand (the reference): every example's
# decoded targets. Qwen3 renders the last reply with its think block and history without: one example per reply.
# Mistral NeMo puts the system prompt only into the user turn being answered: one example per reply too.
TARGETS = {
    "tiny-llama-3.2": [["4<|eot_id|>", "6 exactly<|eot_id|>"]],
    "tiny-qwen2.5": [["4<|im_end|>", "6 exactly<|im_end|>"]],
    "tiny-qwen3-0.6b": [["<think>\n\n</think>\n\n6 exactly<|im_end|>"], ["<think>\n\n</think>\n\n4<|im_end|>"]],
    "tiny-gemma-3-270m": [["4<end_of_turn>", "6 exactly<end_of_turn>"]],
    "tiny-phi-3": [["4<|end|>", "6 exactly<|end|>"]],
    "tiny-phi-4-mini": [["4<|end|>", "6 exactly<|end|>"]],
    "tiny-mistral-nemo": [["4</s>"], ["6 exactly</s>"]],
}
# the released configs' distinguishing keys, as transformers writes them back
KEYS = {
    "tiny-llama-3.2": {
        "rope_parameters.rope_type": "llama3",
        "rope_parameters.factor": 32.0,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
    },
    "tiny-qwen2.5": {"tie_word_embeddings": True, "vocab_size": 151936},
    "tiny-qwen3-0.6b": {"head_dim": 32, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 151936},
    "tiny-gemma-3-270m": {
        "query_pre_attn_scalar": 32,
        "sliding_window": 32,
        "vocab_size": 262144,
        "rope_parameters.sliding_attention.rope_theta": 10000.0,
        "rope_parameters.full_attention.rope_theta": 1000000.0,
    },
    "tiny-phi-3": {"vocab_size": 32064, "tie_word_embeddings": False, "sliding_window": 2047},
    "tiny-phi-4-mini": {
        "partial_rotary_factor": 0.75,
        "rope_parameters.rope_type": "longrope",
        "tie_word_embeddings": True,
        "vocab_size": 200064,
    },
    "tiny-mistral-nemo": {"head_dim": 32, "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 131072},
}


def _get(cfg, dotted):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


@pytest.mark.parametrize("name", NAMES)
def test_the_released_config_and_tokenizer_load(name):
    d = family_dir(name)
    cfg = json.loads((d / "config.json").read_text())
    for key, want in KEYS[name].items():
        assert _get(cfg, key) == want, key
    model, tok = load_model(d)
    assert len(tok) <= cfg["vocab_size"] + 1 and tok.chat_template  # Gemma's vision token sits at vocab_size
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == FAMILIES[name].generation["eos_token_id"]
    assert type(model).__name__ == FAMILIES[name].config["architectures"][0]


@pytest.mark.parametrize("name", NAMES)
def test_masking_trains_each_reply_as_the_template_renders_it(name):
    tok = AutoTokenizer.from_pretrained(family_dir(name))
    exs = encode_conversation_examples(tok, CONV)
    got = []
    for ex in exs:
        runs, cur = [], []
        for i, t in zip(ex["input_ids"], ex["labels"]):
            if t != IGNORE_INDEX:
                cur.append(i)
            elif cur:
                runs.append(tok.decode(cur)), cur.clear()
        if cur:
            runs.append(tok.decode(cur))
        got.append(runs)
    # Phi-3's chat tokens strip the whitespace after them (rstrip): decode shows the prefix space
    assert [[r.strip() for r in e] for e in got] == [[r.strip() for r in e] for e in TARGETS[name]]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_format_fills_to_the_hf_rendering(name):
    tok = AutoTokenizer.from_pretrained(family_dir(name))
    fmt = derive(tok)
    for system, prompt in (("", "Name two colours."), ("Reply in French.", "Good morning, how are you?")):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        # what ExecuTorch's runner encodes: num_bos BOS tokens, then the filled format with special tokens parsed
        got = [tok.bos_token_id] * fmt["num_bos"] + tok(fill(fmt, prompt, system), add_special_tokens=False)[
            "input_ids"
        ]
        assert got == want


@pytest.mark.parametrize("name", NAMES)
def test_gguf_tokenizer_tokenizes_as_hf_on_llama_cpp(name):
    report = gguf.check_tokenizer(family_dir(name))
    want_pre = {
        "tiny-llama-3.2": "llama-bpe",
        "tiny-qwen2.5": "qwen2",
        "tiny-qwen3-0.6b": "qwen2",
        "tiny-gemma-3-270m": "default",
        "tiny-phi-3": "default",
        "tiny-phi-4-mini": "gpt-4o",
        "tiny-mistral-nemo": "tekken",
    }[name]
    assert report["pre"] == want_pre and report["strings"] >= 3
