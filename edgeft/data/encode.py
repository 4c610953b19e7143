"""Conversations and raw text to token ids with labels: loss on assistant tokens only, for any chat template.

Masking is template-agnostic and works in text space: for each assistant turn, the conversation up to that turn is
rendered with the generation prompt and must be a string prefix of the rendering that includes the turn; the
characters in between (the reply and its end-of-turn token, not the template's trailing whitespace) are the
assistant's. The whole conversation is tokenised once with offsets, and a token is a target when it starts inside an
assistant span. Working on characters rather than token prefixes keeps masking right for tokenizers that merge
across the boundary of a turn. A template for which the prefix property fails is reported, not silently mis-masked.

Raw text (continued pretraining) is tokenised with the tokenizer's own special tokens plus EOS, every token a target,
and cut into max_seq_length chunks, each trained as its own sequence.

Examples longer than max_seq_length are dropped with a warning rather than truncated (a truncated reply teaches the
model to stop mid-answer); a dataset left empty by that, or with every label masked, is one clear error.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeft.errors import EdgeftError

IGNORE_INDEX = -100
log = logging.getLogger("edgeft")


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template_name: str = "the model's") \
        -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies (with end-of-turn tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeftError("the tokenizer has no chat template; pass --chat-template")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(prefix):
            raise EdgeftError(
                f"{template_name} chat template does not render conversations prefix-consistently, so assistant "
                "tokens cannot be located for loss masking; pass --chat-template with a registry template"
            )
        end = len(upto.rstrip())  # the reply and its end-of-turn token, not the newline after it
        if end > len(prefix):
            spans.append((len(prefix), end))
    return full, spans


def _label(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for i, (start, stop) in enumerate(offsets):
        if stop <= start:  # zero-width (added) tokens never start inside a reply
            continue
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            labels[i] = ids[i]
    return labels


def _tokenize(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    if not getattr(tokenizer, "is_fast", True):
        raise EdgeftError("loss masking needs a fast (Rust) tokenizer with offset mappings")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]],
                        template_name: str = "the model's") -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one conversation; labels are -100 outside assistant replies."""
    text, spans = assistant_spans(tokenizer, messages, template_name)
    (ids,), (offs,) = _tokenize(tokenizer, [text])
    return {"input_ids": list(ids), "labels": _label(ids, offs, spans)}


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation's prompt, ending with the assistant's generation prompt."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_text(tokenizer: Any, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """A raw-text document as chunks of at most ``max_length`` tokens, every token a target."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # documents end: the model learns where text stops
    return [{"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length]}
            for i in range(0, len(ids), max_length) if len(ids[i : i + max_length]) > 1]


def _has_target(ex: dict[str, list[int]]) -> bool:
    return any(t != IGNORE_INDEX for t in ex["labels"][1:])  # the first token is never predicted


def encode_dataset(
    tokenizer: Any, records: list, max_length: int, template_name: str = "the model's"
) -> list[dict[str, list[int]]]:
    """Encode conversations (masked) and raw-text documents (chunked); drop what cannot be trained on.

    Conversations longer than ``max_length`` are dropped (logged). Errors name the template and show one row when
    nothing is left.
    """
    if not records:
        raise EdgeftError("the dataset is empty")
    convs = [(i, r) for i, r in enumerate(records) if not isinstance(r, str)]
    encoded: list[tuple[int, dict[str, list[int]]]] = []
    if convs:
        rendered = [assistant_spans(tokenizer, r, template_name) for _, r in convs]
        ids, offs = _tokenize(tokenizer, [t for t, _ in rendered])
        for (i, _), (_, spans), tid, toff in zip(convs, rendered, ids, offs):
            encoded.append((i, {"input_ids": list(tid), "labels": _label(tid, toff, spans)}))
    texts = [ex for r in records if isinstance(r, str) for ex in encode_text(tokenizer, r, max_length)]
    too_long = [(i, ex) for i, ex in encoded if len(ex["input_ids"]) > max_length]
    kept = [ex for _, ex in encoded if len(ex["input_ids"]) <= max_length]
    masked = [ex for ex in kept if not _has_target(ex)]
    out = [ex for ex in kept if _has_target(ex)] + texts
    if too_long:
        shortest = min(len(ex["input_ids"]) for _, ex in too_long)
        if not kept and not texts:
            raise EdgeftError(
                f"every example is longer than max_seq_length={max_length} tokens (the shortest has {shortest}); "
                "raise --max-seq-length"
            )
        log.warning("dropped %d of %d conversations longer than max_seq_length=%d tokens",
                    len(too_long), len(encoded), max_length)
    if not out:
        sample = next((records[i] for i, _ in convs), records[0])
        raise EdgeftError(
            f"every example has all labels masked with the {template_name} chat template (no assistant tokens "
            f"found; first row: {str(sample)[:200]})"
        )
    if masked:
        log.warning("dropped %d conversations with no assistant tokens to learn", len(masked))
    return out
