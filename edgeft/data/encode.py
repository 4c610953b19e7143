"""Conversations and raw text to token ids with labels: loss on assistant tokens only, for any chat template.

- Masking works in text space: a token is a target when it starts inside an assistant reply, where a reply is what
  rendering the conversation through that turn adds after rendering it up to the generation prompt. A template for
  which this prefix property fails is reported, not silently mis-masked; templates that render history unlike the
  turn being generated (Qwen3's ``<think>``, Mistral NeMo's system prompt) train each reply after exactly the text
  the model sees when it generates it (one example per turn where needed).
- Raw text (continued pretraining): each document gets the tokenizer's own special tokens and an EOS, documents
  are packed back to back into full ``max_seq_length`` rows (:func:`pack_documents`), ``position_ids`` restart at
  every document so attention never crosses one, and every token of a document but its first is a target exactly
  once.
- Examples longer than ``max_seq_length`` are dropped with a warning, never truncated; a dataset left empty, or
  with every label masked, is one clear ``EdgeftError``.

The exact rules and why: docs/data.md.
"""

from __future__ import annotations

import logging
from typing import Any

from edgeft.errors import EdgeftError

IGNORE_INDEX = -100
log = logging.getLogger("edgeft")


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _reply_end(tokenizer: Any, upto: str, upto_gen: str) -> int:
    """Where the last turn of ``upto`` ends: where it and its generation-prompt rendering part, never inside a
    special token both continue differently, less trailing whitespace."""
    c = next((i for i, (a, b) in enumerate(zip(upto, upto_gen)) if a != b), min(len(upto), len(upto_gen)))
    if c < len(upto) and c < len(upto_gen):  # they part: do not cut an added token ("<|end" + "oftext|>")
        added = [t for t in tokenizer.get_added_vocab() if len(t) > 1]
        longest = max((len(t) for t in added), default=0)
        for start in range(max(0, c - longest + 1), c):
            if any(start + len(t) > c and (upto.startswith(t, start) or upto_gen.startswith(t, start)) for t in added):
                c = start
                break
    return len(upto[:c].rstrip())


def conversation_spans(
    tokenizer: Any, messages: list[dict[str, str]], template_name: str = "the model's"
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Rendered texts and the character spans of their assistant replies (with end-of-turn tokens): the whole
    conversation, plus one text per reply that the template renders differently once it is history (module doc)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeftError(
            "the tokenizer has no chat template, which conversations need; pass --chat-template (raw "
            "text trains without one)"
        )
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    own: list[tuple[str, list[tuple[int, int]]]] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:k], add_generation_prompt=True)
        reply = _reply(tokenizer, messages[: k + 1], prefix)
        if reply is None and messages[0]["role"] == "system":
            # a system prompt rendered only before the turn being generated (Mistral NeMo): the reply's text from
            # the conversation without it, after the prompt the model is given
            reply = _reply(tokenizer, messages[1 : k + 1], _render(tokenizer, messages[1:k], True))
        if reply is None:
            raise EdgeftError(
                f"{template_name} chat template does not render conversations prefix-consistently, so assistant "
                "tokens cannot be located for loss masking; pass --chat-template with a registry template"
            )
        if not reply.strip():
            continue
        if full.startswith(prefix + reply):
            spans.append((len(prefix), len(prefix) + len(reply)))
        else:  # history renders this reply differently: train it where it was generated
            own.append((prefix + reply, [(len(prefix), len(prefix) + len(reply))]))
    return [(full, spans), *own] if spans or not own else own


def _reply(tokenizer: Any, upto_messages: list[dict[str, str]], prefix: str) -> str | None:
    """The text the template adds for the last (assistant) message after ``prefix``, with its end-of-turn token;
    None if the rendering does not start with ``prefix``."""
    upto = _render(tokenizer, upto_messages, add_generation_prompt=False)
    if not upto.startswith(prefix):
        return None
    # the reply and its end-of-turn token, not the newline after it nor a conversation's closing text
    end = _reply_end(tokenizer, upto, _render(tokenizer, upto_messages, add_generation_prompt=True))
    return upto[len(prefix) : max(end, len(prefix))]


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], template_name: str = "the model's"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant replies (with end-of-turn tokens); for a
    template that re-renders history (see :func:`conversation_spans`), the spans of the replies it keeps as is."""
    return conversation_spans(tokenizer, messages, template_name)[0]


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


def encode_conversation(
    tokenizer: Any, messages: list[dict[str, str]], template_name: str = "the model's"
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one conversation; labels are -100 outside assistant replies (for a template
    that re-renders history, the whole conversation's example: :func:`encode_conversation_examples` has them all)."""
    return encode_conversation_examples(tokenizer, messages, template_name)[0]


def encode_conversation_examples(
    tokenizer: Any, messages: list[dict[str, str]], template_name: str = "the model's"
) -> list[dict[str, list[int]]]:
    """Every example one conversation trains as (one, unless the template re-renders history: module doc)."""
    rendered = conversation_spans(tokenizer, messages, template_name)
    ids, offs = _tokenize(tokenizer, [t for t, _ in rendered])
    return [{"input_ids": list(i), "labels": _label(i, o, sp)} for (_, sp), i, o in zip(rendered, ids, offs)]


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """A conversation's prompt as plain text, for a model without a chat template (a base model after continued
    pretraining): the system text, each user turn as ``Question: ...`` then ``Answer:``, each earlier reply after
    its ``Answer:`` ending the line. The model answers after ``Answer:``; its answer ends at the line's end."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        elif m["role"] == "user":
            parts.append(f"Question: {m['content'].strip()}\nAnswer:")
        else:
            parts.append(f" {m['content'].strip()}\n\n")
    return "".join(parts)


def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt as text: through the chat template with the generation prompt, or :func:`plain_prompt` when the
    tokenizer has no template (its BOS is then added as a token by :func:`encode_prompt`)."""
    if getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, messages, add_generation_prompt=True)
    return plain_prompt(messages)


def prompt_lead(tokenizer: Any) -> list[int]:
    """Ids in front of a prompt's text: none with a chat template (it writes its own BOS), else the BOS the
    tokenizer adds to plain text, if any."""
    if getattr(tokenizer, "chat_template", None):
        return []
    from .templates import adds_bos

    return [tokenizer.bos_token_id] if adds_bos(tokenizer) else []


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation's prompt, ending with the assistant's generation prompt (or, without a chat
    template, with the plain-text ``Answer:``)."""
    text = prompt_text(tokenizer, messages)
    return prompt_lead(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_ids(tokenizer: Any, text: str) -> list[int]:
    """A raw-text document's token ids: the tokenizer's own special tokens (BOS as it adds one), then EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # documents end: the model learns where text stops
    return ids


def encode_text(tokenizer: Any, text: str, max_length: int) -> list[dict[str, list[int]]]:
    """One raw-text document alone, as chunks of at most ``max_length`` tokens, every token a target (the last
    chunk may be short: :func:`pack_documents` packs several documents into full rows instead)."""
    ids = document_ids(tokenizer, text)
    return [
        {"input_ids": ids[i : i + max_length], "labels": ids[i : i + max_length]}
        for i in range(0, len(ids), max_length)
        if len(ids[i : i + max_length]) > 1
    ]


def pack_documents(docs: list[list[int]], max_length: int) -> list[dict[str, list[int]]]:
    """Token-id documents concatenated into rows of exactly ``max_length`` tokens (the last row: what remains).

    Each row carries ``position_ids`` restarting at 0 where a document, or a document's piece continued from the
    previous row, starts; the label there is -100 (nothing before it in its sequence predicts it), every other token
    is its own target. A continued piece starts with the token that ended the previous row (its context, already a
    target there), so every token of a document except its first is a target exactly once.
    """
    if max_length < 2:
        raise EdgeftError(f"max_seq_length must be at least 2 tokens to train on text, not {max_length}")
    rows: list[dict[str, list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []

    def emit() -> None:
        labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids, pos)]
        if any(t != IGNORE_INDEX for t in labels):
            rows.append({"input_ids": list(ids), "labels": labels, "position_ids": list(pos)})
        ids.clear()
        pos.clear()

    for doc in docs:
        start = 0  # the piece begins here; after a row break it re-reads the token that ended the previous row
        while True:
            piece = doc[start : start + max_length - len(ids)]
            ids += piece
            pos += range(len(piece))
            end = start + len(piece)
            if len(ids) == max_length:
                emit()
            if end >= len(doc):
                break
            start = end - 1  # continued on the next row (a row break happened: the row was full)
    if ids:
        emit()
    return rows


def _has_target(ex: dict[str, list[int]]) -> bool:
    return any(t != IGNORE_INDEX for t in ex["labels"][1:])  # the first token is never predicted


def encode_dataset(
    tokenizer: Any, records: list, max_length: int, template_name: str = "the model's"
) -> list[dict[str, list[int]]]:
    """Encode conversations (masked) and raw-text documents (packed into full rows); drop what cannot be trained on.

    Conversations longer than ``max_length`` are dropped (logged). Errors name the template and show one row when
    nothing is left.
    """
    if not records:
        raise EdgeftError("the dataset is empty")
    convs = [(i, r) for i, r in enumerate(records) if not isinstance(r, str)]
    encoded: list[tuple[int, dict[str, list[int]]]] = []
    if convs:
        rendered = [(i, r) for i, conv in convs for r in conversation_spans(tokenizer, conv, template_name)]
        ids, offs = _tokenize(tokenizer, [t for _, (t, _) in rendered])
        for (i, (_, spans)), tid, toff in zip(rendered, ids, offs):
            encoded.append((i, {"input_ids": list(tid), "labels": _label(tid, toff, spans)}))
    texts = pack_documents([document_ids(tokenizer, r) for r in records if isinstance(r, str)], max_length)
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
        log.warning(
            "dropped %d of %d conversations longer than max_seq_length=%d tokens",
            len(too_long),
            len(encoded),
            max_length,
        )
    if not out:
        sample = next((records[i] for i, _ in convs), records[0])
        raise EdgeftError(
            f"every example has all labels masked with the {template_name} chat template (no assistant tokens "
            f"found; first row: {str(sample)[:200]})"
        )
    if masked:
        log.warning("dropped %d conversations with no assistant tokens to learn", len(masked))
    return out
