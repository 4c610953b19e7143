"""The device-fit calibration's replay (qat/sensitivity.py ``_Replay``: float hidden states captured once, each
linear's loss from its own layer onward, the head on labelled positions only) against whole forwards of the model,
on three families' attention layouts (Gemma 3's sliding and full attention layers take different masks), with
padded rows, and for a linear in the first layer, the last layer and the head."""

import pytest
import torch

from edgeft.qat import resolve
from edgeft.qat.sensitivity import _Replay, linear_sensitivity


def _batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for rows, length in ((3, 24), (2, 17)):
        ids = torch.randint(5, vocab, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0  # a padded row: its pad positions carry no label
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :7] = -100  # the prompt
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3", "tiny-gemma3"])
def test_replay_equals_whole_forwards(family):
    from edgeft.models import load_model, resolve_model

    model, _ = load_model(resolve_model(family))
    model.eval()
    batches = _batches(model.config.vocab_size)
    n = model.config.num_hidden_layers
    names = [
        "model.layers.0.self_attn.q_proj",
        f"model.layers.{n - 1}.mlp.down_proj",
        "lm_head",
    ]
    plan = resolve("auto", 32)
    with torch.no_grad():
        assert _Replay.build(model, batches) is not None  # the fast path is the one measured
        fast = linear_sensitivity(model, batches, plan, (32,), names=names)
        slow = linear_sensitivity(model, batches, plan, (32,), names=names, fast=False)
    # measured on an AMD EPYC (AVX2), every linear of the three models: |fast - slow| <= 1.0e-6 on the float loss,
    # <= 2.3e-6 on the rises (largest rise 1e-2): the head on a subset of rows and the layers' shorter graph
    # re-associate nothing but GEMM blocking; the bounds below leave ~10x for other CPUs
    assert fast["float_loss"] == pytest.approx(slow["float_loss"], rel=1e-5)
    assert set(fast["sensitivity"][32]) == set(slow["sensitivity"][32])
    for name, rise in slow["sensitivity"][32].items():
        assert fast["sensitivity"][32][name] == pytest.approx(rise, rel=1e-3, abs=2e-5), name
    # the model is left as it was and carries no hook
    assert all(not m._forward_pre_hooks for m in model.modules())
