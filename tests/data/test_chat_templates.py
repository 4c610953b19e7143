"""Chat-template registry: exact renderings (written by hand from each family's published format), assistant-only
labels for every template and multi-turn, BOS/EOS handling, fitting checks, and the template reaching saved files."""

import copy

import pytest
from transformers import AutoTokenizer

from edgeft.data import IGNORE_INDEX, TEMPLATES, apply_template, encode_conversation, encode_dataset, encode_prompt
from edgeft.errors import EdgeftError
from edgeft.models import resolve_model

CONV = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
]
B, E = "<|begin_of_text|>", "<|im_end|>"  # tiny-llama's BOS and EOS
EXPECTED = {
    "chatml": (
        B + "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo"
        "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "qwen2.5": (
        B + "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo"
        "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "qwen3": (
        B + "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
        "</think>\n\nYo<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "A2<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "<|im_end|>",
    ),
    "llama-3": (
        B + "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "gemma-3": (
        B + "<start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
        "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
        "<start_of_turn>model\n",
        "<end_of_turn>",
    ),
    "phi-4": (
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant"
        "<|im_sep|>Yo<|im_end|><|im_start|>user<|im_sep|>Q2<|im_end|><|im_start|>assistant<|im_sep|>A2<|im_end|>",
        "<|im_start|>assistant<|im_sep|>",
        "<|im_end|>",
    ),
    "mistral": (B + "[INST]S\n\nHi[/INST]Yo" + E + "[INST]Q2[/INST]A2" + E, "[/INST]", E),
    "alpaca": (
        B + "S\n\n### Instruction:\nHi\n\n### Response:\nYo" + E + "\n\n### Instruction:\nQ2\n\n### Response:\n"
        "A2" + E + "\n\n",
        "### Response:\n",
        E,
    ),
    "vicuna": (B + "S USER: Hi ASSISTANT: Yo" + E + "USER: Q2 ASSISTANT: A2" + E, "ASSISTANT:", E),
}
SPECIALS = sorted({s for t in TEMPLATES.values() for s in t.special_tokens})


@pytest.fixture(scope="module")
def base_tokenizers():
    return {name: AutoTokenizer.from_pretrained(resolve_model(name)) for name in ("tiny-llama", "tiny-qwen3")}


def _with_specials(tok):
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tok


def test_registry_is_complete():
    assert (
        set(TEMPLATES)
        == set(EXPECTED)
        == {"chatml", "qwen2.5", "qwen3", "llama-3", "gemma-3", "phi-4", "mistral", "alpaca", "vicuna"}
    )


@pytest.mark.parametrize("name", list(EXPECTED))
def test_rendering_labels_and_eos(name, base_tokenizers):
    tok = _with_specials(base_tokenizers["tiny-llama"])
    text, gen, stop = EXPECTED[name]
    if name == "phi-4":  # Phi-4 adds no BOS of its own; tiny-llama's tokenizer adds one to plain text, so auto adds it
        text = B + text
    info = apply_template(tok, name)
    assert info == {"name": name, "stop": stop} and tok.eos_token == stop
    assert tok.apply_chat_template(CONV, tokenize=False) == text
    prompt = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(gen) and text.startswith(prompt)
    ex = encode_conversation(tok, CONV, name)
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(ex["input_ids"], ex["labels"]))
    runs, cur = [], []  # maximal runs of labelled tokens: one per assistant turn
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(i)
    runs += [cur] if cur else []
    lead = " " if name == "vicuna" else ""  # Vicuna's reply starts after "ASSISTANT:" with a space
    assert [tok.decode(r) for r in runs] == [f"{lead}Yo{stop}", f"{lead}A2{stop}"]
    assert tok.decode(encode_prompt(tok, CONV[:2])) == prompt


def test_bos_follows_the_tokenizer(base_tokenizers):
    qwen = copy.deepcopy(base_tokenizers["tiny-qwen3"])  # adds no BOS to plain text
    apply_template(qwen, "chatml")
    assert qwen.apply_chat_template(CONV[1:3], tokenize=False).startswith("<|im_start|>user")
    llama = copy.deepcopy(base_tokenizers["tiny-llama"])
    apply_template(llama, "chatml")
    ids = encode_conversation(llama, CONV[1:3])["input_ids"]
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1  # exactly one BOS


def test_template_that_does_not_fit_the_tokenizer(base_tokenizers):
    tok = copy.deepcopy(base_tokenizers["tiny-qwen3"])
    with pytest.raises(
        EdgeftError,
        match=r"chat template 'llama-3' does not fit the tokenizer of tiny-qwen3: "
        r"'<\|start_header_id\|>' is not one of its tokens",
    ):
        apply_template(tok, "llama-3", "tiny-qwen3")
    with pytest.raises(EdgeftError, match="unknown chat template 'llama-2'"):
        apply_template(tok, "llama-2")
    tok.chat_template = None
    with pytest.raises(
        EdgeftError, match="has no chat template; the data holds conversations, which need one: pass --chat-template"
    ):
        apply_template(tok, None)
    # raw text needs none: the tokenizer keeps none, its EOS ends documents
    assert apply_template(tok, None, needed_by=None) == {"name": None, "stop": tok.eos_token}
    assert tok.chat_template is None
    with pytest.raises(
        EdgeftError,
        match=r"'<\|start_header_id\|>' is not one of its tokens .*\(the data is raw "
        r"text, which needs no chat template: omit --chat-template\)",
    ):
        apply_template(tok, "llama-3", "tiny-qwen3", needed_by=None)


def test_prefix_inconsistent_template_is_reported(base_tokenizers):
    tok = copy.deepcopy(base_tokenizers["tiny-qwen3"])
    # the generation prompt is not how the template renders an assistant turn: no reply can be located
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}reply:{% endif %}"
    )
    with pytest.raises(EdgeftError, match="does not render conversations prefix-consistently"):
        encode_dataset(tok, [CONV], 512)


def test_a_reply_history_renders_differently_trains_where_it_was_generated(base_tokenizers):
    """Like Qwen3's own template: a think block only on the last assistant turn. Each reply is a target exactly
    once, after the text the model is given when it generates it (with its think block), never in history."""
    tok = copy.deepcopy(base_tokenizers["tiny-qwen3"])
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<think></think>"
        "{% endif %}{{ m['content'] }}<|im_end|>{% endfor %}"
    )
    conv = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    exs = encode_dataset(tok, [conv], 512)
    got = sorted(
        (tok.decode(ex["input_ids"]), tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])) for ex in exs
    )
    assert got == [
        ("a<|im_end|><think></think>b<|im_end|>", "<think></think>b<|im_end|>"),
        ("a<|im_end|>b<|im_end|>c<|im_end|><think></think>d<|im_end|>", "<think></think>d<|im_end|>"),
    ]


def test_chosen_template_is_saved_with_the_tokenizer(base_tokenizers, tmp_path):
    tok = copy.deepcopy(base_tokenizers["tiny-qwen3"])
    apply_template(tok, "alpaca")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back.chat_template == tok.chat_template and "### Response:" in back.chat_template
    assert back.apply_chat_template(CONV, tokenize=False) == tok.apply_chat_template(CONV, tokenize=False)
