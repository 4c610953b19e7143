"""Ollama Modelfile beside a GGUF file: the run's chat template, stop tokens and sampling defaults.

Why by hand: Ollama templates are Go ``text/template`` over ``.Messages`` while Hugging Face chat templates are
Jinja, and no library translates one into the other. Rather than parse Jinja, edgeft recognises the template
by what it renders: the HF template is rendered for probe conversations and matched against the known
families (``FAMILIES``: ChatML, Qwen3 (the empty think block of a final assistant turn), Llama-3 headers, Gemma 3
(model role, system prompt folded into the first user turn), Phi-3 and Phi-4-mini (closing EOS)), including a
leading text (a BOS the template writes) and a
default system prompt inserted when the conversation has none (SmolLM2, Qwen2.5 do this; it becomes the
Modelfile's ``SYSTEM``, which Ollama inserts as the first message under the same condition). A template that
renders anything else for any probe (tools, date preambles, content rewriting) is refused in one line: a wrong
template silently degrades every answer.

The Go template is the family's fixed text, the form Ollama's own library models use: it ranges over
``.Messages`` and adds the assistant header after the last message unless that message is the assistant's
(Ollama's prefill). A leading BOS is left out when the GGUF adds BOS itself (llama.cpp tokenizes the prompt
with the file's ``add_bos_token``), so the token sequence matches HF's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.data.templates import adds_bos
from edgeft.errors import EdgeftError
from edgeft.fsutil import write_text
from edgeft.rundir import Exports


@dataclass(frozen=True)
class Family:
    """A chat-template family: how one message is framed, and its Ollama (Go text/template) form."""

    name: str
    header: str  # "{role}" is replaced by the role
    footer: str  # after the content
    stops: tuple[str, ...]
    template: str  # Go text/template; "{prefix}" is replaced by the leading text
    closing: str = ""  # after a conversation that ends with the assistant (Phi-3/Phi-4-mini's EOS)
    think: str = ""  # before the content of a final assistant message (Qwen3's empty think block)
    model_role: str = "assistant"  # the assistant's role name in the header (Gemma: "model")
    fold_system: bool = False  # the system prompt opens the first user turn (Gemma) instead of its own turn

    def block(self, role: str, content: str) -> str:
        role = self.model_role if role == "assistant" else role
        return self.header.replace("{role}", role) + content + self.footer

    def render(self, messages: list[dict[str, str]], prefix: str, system: str | None) -> str:
        """What the Go template renders (Python mirror, used to check the HF template matches the family)."""
        msgs = list(messages)
        if system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": system})  # what Ollama does with SYSTEM
        if self.fold_system and msgs and msgs[0]["role"] == "system":
            head, msgs = msgs[0]["content"], msgs[1:]
            if msgs:
                msgs[0] = {**msgs[0], "content": head + "\n\n" + msgs[0]["content"]}
        out = prefix
        for k, m in enumerate(msgs):
            final = k == len(msgs) - 1 and m["role"] == "assistant"
            out += self.block(m["role"], (self.think if final else "") + m["content"])
        if msgs and msgs[-1]["role"] != "assistant":
            out += self.block("assistant", "")[: -len(self.footer) or None]
        elif msgs:
            out += self.closing
        return out


_LAST = '{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "chatml",
            header="<|im_start|>{role}\n",
            footer="<|im_end|>\n",
            stops=("<|im_end|>", "<|im_start|>"),
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n" + _LAST
                + "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                + '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
                + "{{- end }}"
            ),
        ),
        Family(
            "llama3",
            header="<|start_header_id|>{role}<|end_header_id|>\n\n",
            footer="<|eot_id|>",
            stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n" + _LAST
                + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
                + '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
                + "{{ end }}\n{{- end }}"
            ),
        ),
        Family(
            "qwen3",
            header="<|im_start|>{role}\n",
            footer="<|im_end|>\n",
            stops=("<|im_end|>", "<|im_start|>"),
            think="<think>\n\n</think>\n\n",
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n" + _LAST
                + "<|im_start|>{{ .Role }}\n"
                + '{{ if and $last (eq .Role "assistant") }}<think>\n\n</think>\n\n{{ end }}'
                + "{{ .Content }}<|im_end|>\n"
                + '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
                + "{{- end }}"
            ),
        ),
        Family(
            "phi3",
            header="<|{role}|>\n",
            footer="<|end|>\n",
            stops=("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"),
            closing="<|endoftext|>",
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n" + _LAST
                + "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
                + '{{ if $last }}{{ if ne .Role "assistant" }}<|assistant|>\n{{ else }}<|endoftext|>{{ end }}'
                + "{{ end }}\n"
                + "{{- end }}"
            ),
        ),
        Family(
            "phi4-mini",
            header="<|{role}|>",
            footer="<|end|>",
            stops=("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"),
            closing="<|endoftext|>",
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n" + _LAST
                + "<|{{ .Role }}|>{{ .Content }}<|end|>"
                + '{{ if $last }}{{ if ne .Role "assistant" }}<|assistant|>{{ else }}<|endoftext|>{{ end }}{{ end }}\n'
                + "{{- end }}"
            ),
        ),
        Family(
            "gemma3",
            header="<start_of_turn>{role}\n",
            footer="<end_of_turn>\n",
            stops=("<end_of_turn>", "<start_of_turn>"),
            model_role="model",
            fold_system=True,
            template=(
                '{prefix}{{ $sys := "" }}{{ range $i, $_ := .Messages }}\n' + _LAST
                + '{{ if eq .Role "system" }}{{ $sys = .Content }}{{ else }}'
                + '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
                + '{{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
                + '{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}{{ end }}\n'
                + "{{- end }}"
            ),
        ),
    ]
}

# Probe conversations: the HF template must render each exactly as the family does.
_U1, _A1, _U2, _SYS = "What is 2 + 3?", "5", "And 4 * 6?", "Answer tersely."
PROBES: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": _U1},),
    ({"role": "system", "content": _SYS}, {"role": "user", "content": _U1}),
    (
        {"role": "system", "content": _SYS},
        {"role": "user", "content": _U1},
        {"role": "assistant", "content": _A1},
        {"role": "user", "content": _U2},
    ),
    ({"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}),  # no generation prompt
)

# Used when generation_config.json names no sampling settings (Ollama's own defaults are similar).
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}
_HF_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"
}


@dataclass(frozen=True)
class Translation:
    """An HF chat template expressed for Ollama."""

    family: Family
    prefix: str  # literal text before the first message in the Go template
    system: str | None  # default system prompt (Modelfile SYSTEM)

    @property
    def template(self) -> str:
        return self.family.template.replace("{prefix}", self.prefix)


def _hf_render(tokenizer: Any, messages: tuple[dict[str, str], ...]) -> str:
    gen = messages[-1]["role"] != "assistant"
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)


def translate(tokenizer: Any) -> Translation:
    """Recognise the tokenizer's chat template as a family; raise ``EdgeftError`` if it is not one."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise EdgeftError("Ollama Modelfile: the model has no chat template")
    first = _hf_render(tokenizer, PROBES[0])
    mismatch = None  # the first family whose framing was found but whose probes rendered differently
    for fam in FAMILIES.values():
        user_at = first.find(fam.block("user", _U1))
        if user_at < 0:
            continue
        head, system = first[:user_at], None
        sys_header = fam.header.replace("{role}", "system")
        if sys_header in head and not fam.fold_system:  # a default system prompt before the user's message
            start = head.index(sys_header)
            body = head[start + len(sys_header):]
            if not body.endswith(fam.footer):
                continue
            head, system = head[:start], body[: len(body) - len(fam.footer)]
        bos = tokenizer.bos_token
        prefix = head[len(bos):] if bos and head.startswith(bos) and adds_bos(tokenizer) else head
        lead = head[: len(head) - len(prefix)]  # the BOS llama.cpp adds as a token
        for probe in PROBES:
            want = _hf_render(tokenizer, probe)
            if lead + fam.render(list(probe), prefix, system) != want:
                mismatch = mismatch or (fam, want)
                break
        else:
            return Translation(fam, prefix, system)
    if mismatch:
        fam, want = mismatch
        raise EdgeftError(
            f"Ollama Modelfile: the chat template looks {fam.name} but renders a probe conversation "
            f"differently ({want[:60]!r}...); only ChatML, Qwen3, Llama-3, Gemma 3 and Phi-3/Phi-4-mini style "
            "templates are translated"
        )
    raise EdgeftError(
        "Ollama Modelfile: the chat template is neither ChatML (<|im_start|>), Qwen3, Llama-3 style "
        "(<|start_header_id|>), Gemma 3 nor Phi-3/Phi-4-mini; no Ollama template can be derived"
    )


def _sampling(src: Path) -> dict[str, float]:
    path = src / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    found = {ours: gen[hf] for hf, ours in _HF_SAMPLING.items() if gen.get(hf) is not None}
    return found or dict(DEFAULT_SAMPLING)


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise EdgeftError(f'Ollama Modelfile: the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_path: str | os.PathLike, tokenizer: Any, src: str | os.PathLike) -> str:
    """The Modelfile for ``gguf_path`` (referenced relative to the Modelfile's folder)."""
    return _modelfile(gguf_path, tokenizer, src)[0]


def _modelfile(gguf_path: str | os.PathLike, tokenizer: Any, src: str | os.PathLike) -> tuple[str, Translation]:
    tr = translate(tokenizer)
    stops = list(tr.family.stops)
    eos = tokenizer.eos_token
    if eos and eos not in stops:
        stops.append(eos)
    lines = [
        f"# written by edgeft from {Path(src).name}: {tr.family.name} chat template",
        f"FROM ./{Path(gguf_path).name}",
    ]
    lines.append(f"TEMPLATE {_quote(tr.template, 'chat template')}")
    if tr.system is not None:
        lines.append(f"SYSTEM {_quote(tr.system, 'default system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += [f"PARAMETER {k} {v:g}" for k, v in _sampling(Path(src)).items()]
    return "\n".join(lines) + "\n", tr


# Ollama's plain completion template (its own base-model entries use it): the prompt is passed as it is
RAW_TEMPLATE = "{{ .Prompt }}"


def raw_modelfile_text(gguf_path: str | os.PathLike, tokenizer: Any, src: str | os.PathLike) -> str:
    """The Modelfile of a model without a chat template (a base model, e.g. after continued pretraining on raw
    text): plain completion, stopping at EOS, with the model's sampling defaults."""
    lines = [f"# written by edgeft from {Path(src).name}: no chat template (plain completion)",
             f"FROM ./{Path(gguf_path).name}", f"TEMPLATE {_quote(RAW_TEMPLATE, 'template')}"]
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    lines += [f"PARAMETER {k} {v:g}" for k, v in _sampling(Path(src)).items()]
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: str | os.PathLike, src: str | os.PathLike, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Write ``Modelfile`` beside ``gguf_path`` for the model directory ``src`` (its tokenizer and generation
    config); returns a report. Raises ``EdgeftError`` for a chat template that cannot be translated; a model without
    one gets the plain-completion Modelfile (``family`` "raw")."""
    from transformers import AutoTokenizer

    gguf_path, src = Path(gguf_path), Path(src)
    if not gguf_path.is_file():
        raise EdgeftError(f"Ollama Modelfile: {gguf_path} does not exist; export the GGUF first")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    out = Path(out) if out is not None else Exports(gguf_path.parent).modelfile
    if not isinstance(getattr(tokenizer, "chat_template", None), str):  # a base model: nothing to translate
        write_text(out, raw_modelfile_text(gguf_path, tokenizer, src))
        return {"path": str(out), "gguf": str(gguf_path), "family": "raw", "system": None}
    text, tr = _modelfile(gguf_path, tokenizer, src)
    write_text(out, text)
    return {"path": str(out), "gguf": str(gguf_path), "family": tr.family.name, "system": tr.system}
