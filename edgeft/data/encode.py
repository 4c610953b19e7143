"""Conversations to token ids with the tokenizer's chat template; loss on assistant tokens only.

Masking is template-agnostic: for each assistant turn, the conversation up to that turn is rendered with
``add_generation_prompt=True`` and must be a token prefix of the rendering that includes the turn; the tokens
between the two renderings are the assistant's and are the only ones with labels. A template for which this
prefix property fails is reported, not silently mis-masked.
"""

from __future__ import annotations

from typing import Any

from edgeft.errors import EdgeftError

IGNORE_INDEX = -100


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one conversation; labels are -100 outside assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeftError("the tokenizer has no chat template; pass a model whose tokenizer defines one")
    full = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise EdgeftError(
                "the chat template does not render conversations prefix-consistently, so assistant tokens "
                "cannot be located for loss masking"
            )
        # learn the reply and its end-of-turn token(s), not the template's trailing newline
        end = len(upto)
        while end > len(prefix) and tokenizer.decode(upto[end - 1 : end]).strip() == "":
            end -= 1
        labels[len(prefix) : end] = full[len(prefix) : end]
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation's prompt, ending with the assistant's generation prompt."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_dataset(
    tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int, template_name: str = "the model's"
) -> list[dict[str, list[int]]]:
    """Encode every conversation; drop those left with no target token, and fail if that is all of them."""
    out = []
    for conv in conversations:
        ex = encode_conversation(tokenizer, conv, max_length)
        if any(t != IGNORE_INDEX for t in ex["labels"]):
            out.append(ex)
    if not out:
        sample = conversations[0] if conversations else []
        raise EdgeftError(
            f"every example has all labels masked with {template_name} chat template at max_seq_length={max_length} "
            f"(first row: {str(sample)[:200]})"
        )
    return out


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest row; padded positions carry no label and no attention."""
    import torch

    n = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, ex in enumerate(batch):
        k = len(ex["input_ids"])
        ids[i, :k] = torch.tensor(ex["input_ids"])
        labels[i, :k] = torch.tensor(ex["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
