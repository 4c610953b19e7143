import pytest
import torch

from edgeft.kernels.attention import (
    packed_batch_from_cu_seqlens,
    packed_batch_from_position_ids,
    varlen_attention,
    varlen_attention_reference,
)

from .conftest import assert_close

POS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]])


def test_boundaries_from_position_ids():
    pb = packed_batch_from_position_ids(POS)
    assert pb.cu_seqlens.tolist() == [0, 4, 7, 13, 16, 26, 32]
    assert pb.max_seqlen == 10 and pb.total == 32
    assert pb.doc_ids[:8].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    # one sequence per row: nothing to do, plain causal attention is exact
    assert packed_batch_from_position_ids(torch.arange(16).expand(2, 16)) is None
    # a row that does not start at 0 still starts a new sequence
    assert packed_batch_from_position_ids(torch.tensor([[5, 6, 0, 1]])).cu_seqlens.tolist() == [0, 2, 4]
    same = packed_batch_from_cu_seqlens(pb.cu_seqlens)
    assert torch.equal(same.doc_ids, pb.doc_ids) and same.max_seqlen == pb.max_seqlen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0)])
def test_sdpa_backend_never_crosses_sequences(dtype, window, softcap):
    pb = packed_batch_from_position_ids(POS)
    q = torch.randn(32, 4, 16, dtype=dtype, requires_grad=True)
    k = torch.randn(32, 2, 16, dtype=dtype, requires_grad=True)
    v = torch.randn(32, 2, 16, dtype=dtype, requires_grad=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q64, k64, v64, pb, window=window, softcap=softcap)
    g = torch.randn_like(ref)
    ref.backward(g)
    out = varlen_attention(q, k, v, pb, window=window, softcap=softcap, backend="sdpa")
    out.backward(g.to(dtype))
    tol = 1.0 if dtype == torch.float32 else 0.5
    assert_close(out, ref, dtype, scale=tol)
    for a, b in ((q, q64), (k, k64), (v, v64)):
        assert_close(a.grad, b.grad, dtype)


def test_flex_backend_forward_on_cpu():
    # FlexAttention has no CPU backward; the GPU run checks its gradients.
    pb = packed_batch_from_position_ids(POS)
    q, k, v = torch.randn(32, 4, 16), torch.randn(32, 2, 16), torch.randn(32, 2, 16)
    for window in (None, 3):
        ref = varlen_attention_reference(q, k, v, pb, window=window)
        assert_close(varlen_attention(q, k, v, pb, window=window, backend="flex_eager"), ref, torch.float32, 5)


def test_flex_padded_to_its_bucket_equals_the_reference_on_cpu():
    # compiled FlexAttention runs padding-free batches at a power-of-two token count (one compile per bucket,
    # not per batch): the pad tokens, each a document of its own, change nothing in the real tokens' outputs
    from edgeft.kernels.attention import _flex, flex_bucket

    assert [flex_bucket(t) for t in (1, 32, 128, 129, 5000)] == [128, 128, 128, 256, 8192]
    pb = packed_batch_from_position_ids(POS)
    q, k, v = torch.randn(32, 4, 16), torch.randn(32, 2, 16), torch.randn(32, 2, 16)
    for window, softcap in ((None, None), (3, None), (None, 2.0)):
        ref = varlen_attention_reference(q, k, v, pb, window=window, softcap=softcap)
        out = _flex(q, k, v, pb, True, 16**-0.5, window, softcap, compiled=False, shapes="pow2")
        assert out.shape == q.shape
        assert_close(out, ref, torch.float32, 5)
        assert ("flex_mask", True, window, q.device, 128) in pb.cache


def test_changing_another_sequence_does_not_change_outputs():
    pb = packed_batch_from_position_ids(POS)
    q, k, v = torch.randn(32, 2, 8), torch.randn(32, 2, 8), torch.randn(32, 2, 8)
    out = varlen_attention(q, k, v, pb, backend="sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[4:7] += 5
    v2[4:7] -= 3  # sequence 1 only
    out2 = varlen_attention(q, k2, v2, pb, backend="sdpa")
    assert torch.allclose(out[:4], out2[:4]) and torch.allclose(out[7:], out2[7:])
    assert not torch.allclose(out[4:7], out2[4:7])


def test_flex_compile_failure_falls_back_to_masked_sdpa(monkeypatch):
    from edgeft.kernels import attention

    def broken(*args, **kwargs):
        raise RuntimeError("LoweringException: simulated inductor failure")

    monkeypatch.setattr(attention, "_compiled_flex", lambda dynamic=False: broken)
    monkeypatch.setattr(attention, "_FLEX_FAILED", set())
    pb = packed_batch_from_position_ids(POS)
    q, k, v = torch.randn(32, 4, 16), torch.randn(32, 2, 16), torch.randn(32, 2, 16)
    with pytest.warns(UserWarning, match="FlexAttention did not compile"):
        out = varlen_attention(q, k, v, pb, backend="flex")
    assert_close(out, varlen_attention_reference(q, k, v, pb), torch.float32, 5)
    assert (torch.float32, q.device) in attention._FLEX_FAILED


@pytest.mark.parametrize("docs", [[128], [5, 300, 83, 12], [1] * 40 + [216], [127, 1, 128, 256], [500, 12]])
def test_document_block_mask_equals_create_block_mask(docs):
    # the O((n/128)^2) construction marks the same empty / partial / full blocks as create_block_mask's n x n
    # evaluation, and FlexAttention through it gives the reference's outputs
    from torch.nn.attention.flex_attention import create_block_mask

    from edgeft.kernels.attention import _flex, document_block_mask, flex_bucket, packed_batch_from_cu_seqlens

    total = sum(docs)
    n = flex_bucket(total)
    doc = torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), torch.tensor(docs))
    doc = torch.cat([doc, torch.arange(len(docs), len(docs) + n - total, dtype=torch.int32)])

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    ours = document_block_mask(doc, mask_mod)
    ref = create_block_mask(mask_mod, 1, None, n, n, device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())
    for a, b in ((ours.kv_num_blocks, ref.kv_num_blocks), (ours.full_kv_num_blocks, ref.full_kv_num_blocks)):
        assert torch.equal(a, b)
    for num, a, b in (
        (ours.kv_num_blocks, ours.kv_indices, ref.kv_indices),
        (ours.full_kv_num_blocks, ours.full_kv_indices, ref.full_kv_indices),
    ):
        for r in range(num.shape[-1]):
            c = int(num[0, 0, r])
            assert sorted(a[0, 0, r, :c].tolist()) == sorted(b[0, 0, r, :c].tolist())
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32)
    pb = packed_batch_from_cu_seqlens(cu)
    q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)
    out = _flex(q, k, v, pb, True, 0.25, None, None, compiled=False, shapes="pow2")
    assert_close(out, varlen_attention_reference(q, k, v, pb, scale=0.25), torch.float32, 5)
