"""Training loop: accumulation equals a larger batch, loss normalisation, schedules, pipeline wiring."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edgeft.data import collate, encode_dataset, load_conversations
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model
from edgeft.training import Optimization, Reporting, TrainData, backward_window, lm_loss_sum, lr_factor, train_loop


@pytest.fixture(scope="module")
def tiny():
    model_dir = resolve_model("tiny-llama")
    _, tok = load_model(model_dir)
    examples = encode_dataset(tok, load_conversations("builtin:tasks")[:64], max_length=128)
    return model_dir, tok, examples


def test_loss_sum_matches_reference_cross_entropy(tiny):
    model_dir, tok, examples = tiny
    model, _ = load_model(model_dir)
    batch = collate(examples[:4], tok.pad_token_id)
    loss_sum, n = lm_loss_sum(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.stack(
        [F.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100, reduction="sum") for i in range(4)]
    ).sum()
    assert int(n) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-4)


def _run(model_dir, tok, examples, batch_size, grad_accum, path):
    torch.manual_seed(0)
    model, _ = load_model(model_dir)
    train_loop(
        model,
        TrainData(examples, tok.pad_token_id),
        Optimization(max_steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, seed=7, warmup_ratio=0.0),
        reporting=Reporting(metrics_path=path, progress=False),
    )
    return [json.loads(l)["loss"] for l in open(path)], model


def test_accumulation_equals_larger_batch(tiny, tmp_path):
    """batch 8 x accumulation 1 and batch 1 x accumulation 8: same loss curve, same gradients."""
    model_dir, tok, examples = tiny
    big, _ = _run(model_dir, tok, examples, 8, 1, tmp_path / "a.jsonl")
    acc, _ = _run(model_dir, tok, examples, 1, 8, tmp_path / "b.jsonl")
    assert big == pytest.approx(acc, rel=1e-5)
    model, _ = load_model(model_dir)
    rows = examples[:8]
    loss_a, n_a = backward_window(model, [collate(rows, tok.pad_token_id)])
    grads_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_b, n_b = backward_window(model, [collate([r], tok.pad_token_id) for r in rows])
    assert n_a == n_b and loss_a == pytest.approx(loss_b, rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), grads_a):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)


def test_nan_loss_stops_with_the_step(tiny, tmp_path):
    model_dir, tok, examples = tiny
    model, _ = load_model(model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.nan)
    with pytest.raises(EdgeftError, match="step 1"):
        train_loop(
            model,
            TrainData(examples, tok.pad_token_id),
            Optimization(max_steps=2, batch_size=2, lr=1e-3),
            reporting=Reporting(progress=False),
        )
