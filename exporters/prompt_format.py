"""The run's chat template as a prompt format the phone apps can fill in: ``prompt_format.json`` beside the ``.pte``.

Why: the apps (Kotlin, Swift) have no Jinja engine, and ExecuTorch's runner takes a prompt string. A one-turn chat is
all they send (system prompt + one user message + the generation prompt), so the run's own template is rendered for
exactly that, with the literal placeholders ``{system}`` and ``{prompt}`` as the message contents, and written as two
strings. The derivation is checked: filling the placeholders with probe texts must give exactly what the HF template
renders for them (a template that rewrites content beyond trimming its ends is refused in one line). A leading BOS
that the template writes is left out and counted in ``num_bos`` when the tokenizer adds one itself (ExecuTorch's
runner adds ``num_bos`` BOS tokens, never the post-processor's), so the runner sees HF's token sequence. A template
that reads the clock (Llama 3.x's "Today Date") is rendered at export: the date is fixed in the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeft.data.templates import adds_bos
from edgeft.errors import EdgeftError
from edgeft.fsutil import write_json

FILE = "prompt_format.json"
SYSTEM, PROMPT = "{system}", "{prompt}"
_PROBES = (("Answer tersely.", "What is 2 + 3?"), ("You are terse.\nTwo lines.", "Hi there!\nName three primes."))


def _render(tokenizer: Any, system: str | None, prompt: str) -> str:
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def derive(tokenizer: Any) -> dict[str, Any]:
    """``{"prompt", "prompt_with_system", "num_bos", "stop"}`` for ``tokenizer``'s chat template (see module doc); a
    tokenizer without one gets plain completion (the prompt as it is, no system prompt)."""
    num_bos = int(adds_bos(tokenizer))
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        # a base model (continued pretraining on raw text): plain completion, the user's text as it is
        return {
            "prompt": PROMPT,
            "prompt_with_system": None,
            "num_bos": num_bos,
            "stop": [t for t in [tokenizer.eos_token] if t],
        }
    bos = tokenizer.bos_token or ""

    def strip_bos(text: str) -> str:
        return text[len(bos) :] if num_bos and bos and text.startswith(bos) else text

    plain = strip_bos(_render(tokenizer, None, PROMPT))
    with_system = strip_bos(_render(tokenizer, SYSTEM, PROMPT))
    if PROMPT not in plain or PROMPT not in with_system:
        raise EdgeftError("prompt format: the chat template does not render the user's message as given")
    if SYSTEM not in with_system:  # a template that drops system prompts: the apps send none
        with_system = None
    for system, prompt in _PROBES:
        for fmt, sys_ in ((plain, None), (with_system, system)):
            if fmt is None:
                continue
            got = (fmt.replace(SYSTEM, sys_) if sys_ is not None else fmt).replace(PROMPT, prompt)
            if got != strip_bos(_render(tokenizer, sys_, prompt)):
                raise EdgeftError(
                    "prompt format: the chat template rewrites message contents (rendering a probe differently from "
                    "the filled-in format); the apps cannot apply it"
                )
    stop = [t for t in dict.fromkeys([tokenizer.eos_token]) if t]
    return {"prompt": plain, "prompt_with_system": with_system, "num_bos": num_bos, "stop": stop}


def fill(fmt: dict[str, Any], prompt: str, system: str = "") -> str:
    """What the apps do with the file: the one-turn prompt string given to the runner (Python mirror)."""
    if system and fmt.get("prompt_with_system"):
        return fmt["prompt_with_system"].replace(SYSTEM, system).replace(PROMPT, prompt)
    return fmt["prompt"].replace(PROMPT, prompt)


def write_prompt_format(src: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``out_dir/prompt_format.json`` for the model directory ``src`` (atomically); returns its content."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    fmt = derive(tokenizer)
    gen_path = Path(src) / "generation_config.json"
    if gen_path.is_file():  # the stop strings of every end-of-generation id (the .pte's get_eos_ids stops on them too)
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        fmt["stop"] = list(dict.fromkeys([*fmt["stop"], *tokenizer.convert_ids_to_tokens(ids)]))
    write_json(Path(out_dir) / FILE, fmt)
    return fmt
