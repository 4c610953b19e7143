"""What a QAT step keeps for its backward: the raw weights, never a fake-quantized copy of them.

Saving fq(W) (or, with LoRA, a new fq(W + s·B·A) per layer and micro-batch) would keep a second copy of the model's
weights alive from each layer's forward to its backward; the linear Functions recompute it in the backward
instead (``Projection.weight_fq``); o_proj re-quantizes its input rather than keeping a copy next to the attention's.
Checked by recording every tensor autograd saves during a forward, patched
(fused kernels) and unpatched, LoRA and full fine-tuning, and comparing the gradients with the saving path's.
"""

import copy

import pytest
import torch
from qat_helpers import rel_err, tiny_model

import edgeft.kernels as K
from edgeft import qat
from edgeft.arch import kernel_specs

KERNELS = kernel_specs()


def _saved_during(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _weight_shaped_copies(model, saved):
    """Saved tensors shaped like some linear's weight that are not a parameter's own storage."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes |= {s[::-1] for s in shapes}
    return [tuple(t.shape) for t in saved if tuple(t.shape) in shapes and t.data_ptr() not in params]


def _saved_bytes(model, saved):
    """Bytes of the distinct storages saved for the backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(n for ptr, n in sizes.items() if ptr not in params)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("patched", [True, False], ids=["patched", "unpatched"])
def test_no_fake_quantized_weight_is_saved_and_gradients_are_unchanged(lora, patched):
    m = tiny_model("qwen3", lora=lora, tie_word_embeddings=False)
    if not lora:
        m.requires_grad_(True)
    if patched:
        assert K.patch(m, KERNELS, checkpoint=None)
    ids = torch.randint(3, 300, (2, 12))

    def loss():
        if patched:
            s, n = K.causal_lm_loss(m, ids, ids)
            return s / n
        return m(input_ids=ids, labels=ids).loss

    # without QAT, the only weight-shaped tensor saved is the fused loss's head gradient (made in its forward)
    baseline = _weight_shaped_copies(m, _saved_during(loss)[1])
    assert len(baseline) == (1 if patched and not lora else 0)
    base_bytes = _saved_bytes(m, _saved_during(loss)[1])
    qat.prepare(m, "int8-int4")
    out, saved = _saved_during(loss)
    assert _weight_shaped_copies(m, saved) == baseline
    if patched:  # and no activation copy either: o_proj re-quantizes the attention output it shares
        assert _saved_bytes(m, saved) == base_bytes
    out.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert grads

    # the same model with fq(W) materialised once and saved by plain autograd (the old path) gives the same gradients
    ref = copy.deepcopy(m)
    ref.zero_grad()
    for mod in ref.modules():
        if hasattr(mod, "edgeft_projection"):
            mod.edgeft_projection = _saving(mod.edgeft_projection)
    (
        K.causal_lm_loss(ref, ids, ids)[0] / K.causal_lm_loss(ref, ids, ids)[1]
        if patched
        else ref(input_ids=ids, labels=ids).loss
    ).backward()
    for n, g in grads.items():
        r = dict(ref.named_parameters())[n].grad
        assert rel_err(g, r) < 1e-5, (n, rel_err(g, r))


def _saving(hook):
    """A projection hook that hands the Functions an already fake-quantized weight (what was saved before)."""
    import dataclasses

    from edgeft.qat.fake_quant import ste

    def wrapped():
        p = hook()
        if p.weight_fq is None:
            return p
        fq = p.weight_fq
        lora = (p.lora_A, p.lora_B, p.scale) if p.merged else None
        w = ste(lambda t: fq(t, lora), p.weight)  # autograd saves nothing here; the matmul saves w
        return dataclasses.replace(p, weight=w, weight_fq=None)

    return wrapped
