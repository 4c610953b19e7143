"""Chat templates as data: a registry of the formats models are trained in, with their BOS and end-of-turn tokens.

Why a registry rather than only the tokenizer's own template: base models often ship none, some ship one that does
not render conversations prefix-consistently (so assistant tokens cannot be located for loss masking), and a run must
record exactly which format it was trained in, because every exporter (GGUF metadata, Ollama Modelfile, the .pte's
tokenizer files) carries the run's tokenizer files and a mismatched template is the first cause of gibberish after
export. :func:`apply_template` therefore writes the chosen Jinja template into the tokenizer (saved with model/ and
converted/) and makes its end-of-turn token the tokenizer's EOS, so runtimes stop where training taught the model to.

Every template here renders each turn the same way wherever it appears, so "prompt up to an assistant turn with the
generation prompt" is always a string prefix of "the conversation including that turn" (what masking relies on).
Qwen3's own template is not (it adds a think block to the last turn only); the ``qwen3`` entry is its non-thinking
form with the empty think block in every assistant turn, which is what Qwen3 sees at inference with thinking off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeft.errors import EdgeftError

# A template's system prompt, folded where a format has no system role (Gemma, Mistral) into the first user turn.
_SYSTEM_FIRST = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = DEFAULT %}{%- endif %}"
)


def _with_default(jinja: str, default: str | None) -> str:
    return jinja.replace("DEFAULT", repr(default) if default is not None else "none")


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format. ``stop`` is the end-of-turn text the model learns and runtimes stop on ("{eos}": the
    tokenizer's own EOS). ``special_tokens`` must each be a single token of the tokenizer for the template to fit.
    ``bos``: True renders the tokenizer's BOS first; None ("auto") does so when the tokenizer adds one to plain text
    (the model family expects it)."""

    name: str
    jinja: str
    stop: str
    special_tokens: tuple[str, ...]
    bos: bool | None
    description: str


_CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN25 = _with_default(
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + DEFAULT + '<|im_end|>\\n' }}{%- endif %}" + _CHATML,
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
)

_QWEN3 = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)

_LLAMA3 = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_GEMMA3 = _with_default(
    "{{- bos_token }}" + _SYSTEM_FIRST + "{%- for m in messages %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{%- set content = (system + '\\n\\n' + m['content']) if (loop.first and system and m['role'] == 'user') "
    "else m['content'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}",
    None,
)

_PHI4 = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}"
)

# Mistral's current (tekken) layout: no spaces around [INST]/[/INST]; the system prompt opens the first user turn.
_MISTRAL = _with_default(
    "{{- bos_token }}" + _SYSTEM_FIRST + "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}"
    "{{- '[INST]' + ((system + '\\n\\n') if (loop.first and system) else '') + m['content'] + '[/INST]' }}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}",
    None,
)

_ALPACA = _with_default(
    _SYSTEM_FIRST + "{%- if system %}{{- system + '\\n\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{%- else %}{{- '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
)

_VICUNA = _with_default(
    _SYSTEM_FIRST + "{%- if system %}{{- system + ' ' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- 'USER: ' + m['content'] + ' ' }}"
    "{%- else %}{{- 'ASSISTANT: ' + m['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'ASSISTANT:' }}{%- endif %}",
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate(
            "chatml",
            _CHATML,
            "<|im_end|>",
            ("<|im_start|>", "<|im_end|>"),
            None,
            "ChatML (<|im_start|>role ... <|im_end|>): SmolLM2, many community models",
        ),
        ChatTemplate(
            "qwen2.5",
            _QWEN25,
            "<|im_end|>",
            ("<|im_start|>", "<|im_end|>"),
            None,
            "Qwen2.5: ChatML with Qwen's default system prompt",
        ),
        ChatTemplate(
            "qwen3",
            _QWEN3,
            "<|im_end|>",
            ("<|im_start|>", "<|im_end|>"),
            None,
            "Qwen3 non-thinking: ChatML with an empty <think></think> block in each assistant turn",
        ),
        ChatTemplate(
            "llama-3",
            _LLAMA3,
            "<|eot_id|>",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            True,
            "Llama 3.x (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>), BOS first",
        ),
        ChatTemplate(
            "gemma-3",
            _GEMMA3,
            "<end_of_turn>",
            ("<start_of_turn>", "<end_of_turn>"),
            True,
            "Gemma 3 (<start_of_turn>user/model ... <end_of_turn>), system folded into the first turn",
        ),
        ChatTemplate(
            "phi-4",
            _PHI4,
            "<|im_end|>",
            ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
            None,
            "Phi-4 (<|im_start|>role<|im_sep|> ... <|im_end|>)",
        ),
        ChatTemplate(
            "mistral",
            _MISTRAL,
            "{eos}",
            (),
            True,
            "Mistral ([INST]user[/INST]assistant</s>), BOS first, system in the first turn",
        ),
        ChatTemplate(
            "alpaca",
            _ALPACA,
            "{eos}",
            (),
            None,
            "Alpaca (### Instruction: / ### Response:), plain text, EOS after each response",
        ),
        ChatTemplate("vicuna", _VICUNA, "{eos}", (), None, "Vicuna v1.1 (USER: ... ASSISTANT: ...</s>), plain text"),
    ]
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise EdgeftError(
            f"unknown chat template {name!r}; choose from {', '.join(TEMPLATES)} (or omit it to use the model's own)"
        )
    return TEMPLATES[name]


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS in front of plain text (the model family expects one; llama.cpp reads the
    same from the GGUF, ExecuTorch's runner and the apps from prompt_format.json)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_sp) > len(without) and with_sp[0] == bos


def apply_template(
    tokenizer: Any, name: str | None, model: str = "the model", needed_by: str | None = "the data holds conversations"
) -> dict[str, Any]:
    """Install template ``name`` (None: keep the tokenizer's own) on ``tokenizer``; returns what was chosen.

    ``needed_by`` says which rows need a template (conversations, to render and mask: "the data holds
    conversations"); None when the data is raw text only, which trains on any tokenizer: then a tokenizer without a
    template keeps none (``{"name": None}``).
    Raises one clear error when conversations meet a tokenizer without a template and none was named, or when the
    named template's special tokens are not single tokens of this tokenizer (the model was never trained with them).
    """
    if name is None:
        if not getattr(tokenizer, "chat_template", None):
            if needed_by is None:
                return {"name": None, "stop": tokenizer.eos_token}
            raise EdgeftError(
                f"the tokenizer of {model} has no chat template; {needed_by}, which need one: pass --chat-template "
                f"(one of {', '.join(TEMPLATES)}); raw text ('text' rows, .txt files) trains without one"
            )
        return {"name": "model", "stop": tokenizer.eos_token}
    t = get_template(name)
    raw = "" if needed_by else " (the data is raw text, which needs no chat template: omit --chat-template)"
    for tok in t.special_tokens:
        if _single_token_id(tokenizer, tok) is None:
            raise EdgeftError(
                f"chat template {name!r} does not fit the tokenizer of {model}: {tok!r} is not one of its tokens "
                f"(the model was not trained with this format; use its own template or another one){raw}"
            )
    stop = tokenizer.eos_token if t.stop == "{eos}" else t.stop
    if stop is None:
        raise EdgeftError(
            f"chat template {name!r} ends turns with EOS, but the tokenizer of {model} has no EOS token{raw}"
        )
    if t.bos and tokenizer.bos_token is None:
        raise EdgeftError(f"chat template {name!r} starts with BOS, but the tokenizer of {model} has no BOS token{raw}")
    bos = t.bos if t.bos is not None else adds_bos(tokenizer)
    jinja = t.jinja
    if bos and "bos_token" not in jinja:
        jinja = "{{- bos_token }}" + jinja
    tokenizer.chat_template = jinja
    if stop != tokenizer.eos_token:
        tokenizer.eos_token = stop  # runtimes stop on the tokenizer's EOS: make it the end-of-turn token
    return {"name": name, "stop": stop}


def describe_templates() -> list[dict[str, str]]:
    return [{"name": t.name, "stop": t.stop, "description": t.description} for t in TEMPLATES.values()]
