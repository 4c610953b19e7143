"""Ollama Modelfile beside a GGUF file: the run's chat template, stop tokens and sampling defaults.

Why by hand: Ollama templates are Go ``text/template`` over ``.Messages`` while Hugging Face chat templates are
Jinja, and no library translates one into the other. Rather than parse Jinja, edgeft recognises the template
by what it renders: the HF template is rendered for probe conversations and matched against the known
families (``FAMILIES``: ChatML, Qwen3 (the empty think block of a final assistant turn), Llama-3 headers, Gemma 3
(model role, system prompt folded into the first user turn), Phi-3 and Phi-4-mini (closing EOS), Mistral NeMo
(``[INST]``, system prompt in the last user turn)), including a leading text (a BOS the template writes), a
default system prompt inserted when the conversation has none (SmolLM2, Qwen2.5 do this; it becomes the
Modelfile's ``SYSTEM``, which Ollama inserts as the first message under the same condition) and a fixed opening of
a system turn the template always writes (Llama 3.1/3.2's "Cutting Knowledge Date" and "Today Date" lines: the
date is rendered at export by the template itself, the rule ``prompt_format.json`` follows for the apps, so both
carry the day of export). A template that renders anything else for any probe (tools, content rewriting) is
refused in one line: a wrong template silently degrades every answer.

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
    # where a system prompt goes instead of its own turn: "first" opens the first user turn (Gemma); "last" opens the
    # last turn when the conversation ends with the user's (Mistral NeMo; dropped otherwise, as its template does)
    fold_system: str = ""
    assistant_frame: tuple[str, str] | None = None  # (header, footer) of assistant turns unlike the others' (Mistral)
    # the Go template for a system turn that is always written and opens with fixed text ("{preamble}"): Llama 3.x
    preamble_template: str = ""

    def frame(self, role: str) -> tuple[str, str]:
        """The text before and after a message of ``role``."""
        if role == "assistant" and self.assistant_frame is not None:
            return self.assistant_frame
        role = self.model_role if role == "assistant" else role
        return self.header.replace("{role}", role), self.footer

    def block(self, role: str, content: str) -> str:
        head, foot = self.frame(role)
        return head + content + foot

    def render(
        self, messages: list[dict[str, str]], prefix: str, system: str | None, preamble: str | None = None
    ) -> str:
        """What the Go template renders (Python mirror, used to check the HF template matches the family)."""
        msgs = list(messages)
        if system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": system})  # what Ollama does with SYSTEM
        last_role = msgs[-1]["role"] if msgs else None
        out = prefix
        if preamble is not None:  # the system turn is always written: the preamble, then the system prompt if any
            own = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
            out += self.block("system", preamble + own)
        if self.fold_system and msgs and msgs[0]["role"] == "system":
            head, msgs = msgs[0]["content"], msgs[1:]
            last_role = last_role if msgs else None  # nothing but a system prompt: the template writes nothing
            at = 0 if self.fold_system == "first" else len(msgs) - 1
            if msgs and (self.fold_system == "first" or msgs[at]["role"] == "user"):
                msgs[at] = {**msgs[at], "content": head + "\n\n" + msgs[at]["content"]}
        for k, m in enumerate(msgs):
            final = k == len(msgs) - 1 and m["role"] == "assistant"
            out += self.block(m["role"], (self.think if final else "") + m["content"])
        if last_role is not None and last_role != "assistant":
            out += self.frame("assistant")[0]
        elif last_role is not None:
            out += self.closing
        return out


_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "chatml",
            header="<|im_start|>{role}\n",
            footer="<|im_end|>\n",
            stops=("<|im_end|>", "<|im_start|>"),
            template=(
                "{prefix}{{ range $i, $_ := .Messages }}\n"
                + _LAST
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
                "{prefix}{{ range $i, $_ := .Messages }}\n"
                + _LAST
                + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
                + '{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n'
                + "{{ end }}\n{{- end }}"
            ),
            # Llama 3.1/3.2: a system turn always, opening with the knowledge and export dates; a first system
            # message is its end, the other messages as above
            preamble_template=(
                "{prefix}<|start_header_id|>system<|end_header_id|>\n\n{preamble}"
                + '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ (index .Messages 0).Content }}'
                + "{{ end }}<|eot_id|>\n"
                + "{{- range $i, $_ := .Messages }}\n"
                + _LAST
                + '{{- if or $i (ne .Role "system") }}'
                + "<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}\n"
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
                "{prefix}{{ range $i, $_ := .Messages }}\n"
                + _LAST
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
                "{prefix}{{ range $i, $_ := .Messages }}\n"
                + _LAST
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
                "{prefix}{{ range $i, $_ := .Messages }}\n"
                + _LAST
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
            fold_system="first",
            template=(
                '{prefix}{{ $sys := "" }}{{ range $i, $_ := .Messages }}\n'
                + _LAST
                + '{{ if eq .Role "system" }}{{ $sys = .Content }}{{ else }}'
                + '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
                + '{{ if $sys }}{{ $sys }}\n\n{{ $sys = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
                + '{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}{{ end }}\n'
                + "{{- end }}"
            ),
        ),
        Family(
            "mistral-nemo",
            header="[INST]",
            footer="[/INST]",
            stops=("[INST]", "[/INST]"),
            assistant_frame=("", "</s>"),
            fold_system="last",
            # a first system message is held and opens the last message when that is the user's (Ollama's own
            # Mistral templates do the same with $.System); assistant turns end with EOS
            template=(
                '{prefix}{{ $sys := "" }}{{ $has := false }}{{ range $i, $_ := .Messages }}\n'
                + _LAST
                + '{{- if eq .Role "system" }}{{ if eq $i 0 }}{{ $sys = .Content }}{{ $has = true }}{{ end }}'
                + '{{- else if eq .Role "user" }}[INST]{{ if and $last $has }}{{ $sys }}\n\n{{ end }}{{ .Content }}'
                + "[/INST]\n"
                + '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n'
                + "{{- end }}\n"
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
    # a system prompt in a conversation that ends with the assistant (Mistral NeMo's template drops it)
    ({"role": "system", "content": _SYS}, {"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}),
)

# Used when generation_config.json names no sampling settings (Ollama's own defaults are similar).
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.1}
_HF_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
}


@dataclass(frozen=True)
class Translation:
    """An HF chat template expressed for Ollama."""

    family: Family
    prefix: str  # literal text before the first message in the Go template
    system: str | None  # default system prompt (Modelfile SYSTEM)
    preamble: str | None = None  # fixed opening of the always-written system turn (Llama 3.x's dates)

    @property
    def template(self) -> str:
        if self.preamble is None:
            return self.family.template.replace("{prefix}", _go_text(self.prefix))
        return self.family.preamble_template.replace("{prefix}", _go_text(self.prefix)).replace(
            "{preamble}", _go_text(self.preamble)
        )


def _go_text(text: str) -> str:
    """``text`` as literal Go template text (an action delimiter in it is written as a string)."""
    return text.replace("{{", '{{ "{{" }}')


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
        head = first[:user_at]
        candidates: list[tuple[str | None, str | None]] = [(None, None)]  # (default system prompt, preamble)
        sys_header, sys_footer = fam.frame("system")
        if sys_header in head and not fam.fold_system:  # a system turn before the user's message
            start = head.index(sys_header)
            body = head[start + len(sys_header) :]
            if not body.endswith(sys_footer):
                continue
            head, text = head[:start], body[: len(body) - len(sys_footer)]
            # a fixed opening that a system prompt follows (Llama 3.x), or a default that one replaces (SmolLM2)
            candidates = ([(None, text)] if fam.preamble_template else []) + [(text, None)]
        bos = tokenizer.bos_token
        prefix = head[len(bos) :] if bos and head.startswith(bos) and adds_bos(tokenizer) else head
        lead = head[: len(head) - len(prefix)]  # the BOS llama.cpp adds as a token
        for system, preamble in candidates:
            for probe in PROBES:
                want = _hf_render(tokenizer, probe)
                if lead + fam.render(list(probe), prefix, system, preamble) != want:
                    mismatch = mismatch or (fam, want)
                    break
            else:
                return Translation(fam, prefix, system, preamble)
    if mismatch:
        fam, want = mismatch
        raise EdgeftError(
            f"Ollama Modelfile: the chat template looks {fam.name} but renders a probe conversation "
            f"differently ({want[:60]!r}...); only ChatML, Qwen3, Llama-3, Gemma 3, Phi-3/Phi-4-mini and Mistral "
            "NeMo style templates are translated"
        )
    raise EdgeftError(
        "Ollama Modelfile: the chat template is neither ChatML (<|im_start|>), Qwen3, Llama-3 style "
        "(<|start_header_id|>), Gemma 3, Phi-3/Phi-4-mini nor Mistral NeMo ([INST]); no Ollama template can be derived"
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
    if tr.preamble is not None:
        lines.insert(
            1,
            "# the system turn opens with the template's own lines, its date rendered at export (as in "
            "prompt_format.json)",
        )
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
    lines = [
        f"# written by edgeft from {Path(src).name}: no chat template (plain completion)",
        f"FROM ./{Path(gguf_path).name}",
        f"TEMPLATE {_quote(RAW_TEMPLATE, 'template')}",
    ]
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
