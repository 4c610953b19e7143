import pytest
import torch

from edgeft.kernels.rope import rope_, rope_reference

from .conftest import DTYPES, assert_close


def _cos_sin(pos: torch.Tensor, rot: int, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)  # transformers' layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _hf_rope(q, k, cos, sin):
    # transformers' apply_rotary_pos_emb on (B, S, H, D)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q2, k2 = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q2.transpose(1, 2), k2.transpose(1, 2)


CASES = [  # B, S, Hq, Hk, D
    (1, 1, 1, 1, 8),
    (2, 7, 4, 2, 16),
    (1, 33, 6, 3, 64),  # non-power-of-two heads and length
    (3, 5, 8, 8, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_rope_in_place_matches_transformers(case, dtype):
    B, S, Hq, Hk, D = case
    x = torch.randn(B * S, 24, dtype=dtype, requires_grad=True)
    wq = (torch.randn(Hq * D, 24) / 5).to(dtype).requires_grad_()
    wk = (torch.randn(Hk * D, 24) / 5).to(dtype).requires_grad_()
    pos = torch.randint(0, 50, (B, S))
    cos, sin = _cos_sin(pos, D, dtype)
    q, k = x @ wq.t(), x @ wk.t()  # own their storage: rotated in place
    q_ptr = q.data_ptr()
    q, k = rope_(q, k, cos, sin, head_dim=D, seq_len=S)
    assert q.data_ptr() == q_ptr
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    ((q * gq).sum() + (k * gk).sum()).backward()

    x64, wq64, wk64 = (t.detach().double().requires_grad_() for t in (x, wq, wk))
    q64 = (x64 @ wq64.t()).view(B, S, Hq, D)
    k64 = (x64 @ wk64.t()).view(B, S, Hk, D)
    q64, k64 = _hf_rope(q64, k64, cos.double(), sin.double())
    ((q64.reshape(B * S, -1) * gq.double()).sum() + (k64.reshape(B * S, -1) * gk.double()).sum()).backward()
    assert_close(q.view(B, S, Hq, D), q64, dtype)
    assert_close(k.view(B, S, Hk, D), k64, dtype)
    for a, b in ((x, x64), (wq, wq64), (wk, wk64)):
        assert_close(a.grad, b.grad, dtype)


def test_views_of_fused_qkv_rotate_out_of_place():
    B, S, H, D = 2, 5, 2, 16
    qkv = torch.randn(B, S, 3 * H * D, requires_grad=True)
    q, k, _ = qkv.split(H * D, dim=-1)
    cos, sin = _cos_sin(torch.arange(S).expand(B, S), D)
    q2, k2 = rope_(q, k, cos[:1], sin[:1], head_dim=D)  # (1, S, D) cos broadcast over the batch
    (q2.square().sum() + k2.sum()).backward()
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, _ = qkv64.split(H * D, dim=-1)
    r = _hf_rope(q64.view(B, S, H, D), k64.view(B, S, H, D), cos.double(), sin.double())
    (r[0].square().sum() + r[1].sum()).backward()
    assert_close(q2.view(B, S, H, D), r[0], torch.float32)
    assert_close(qkv.grad, qkv64.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_table_mode_restarts_packed_sequences(dtype):
    B, S, H, D = 2, 8, 3, 32
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    table_cos, table_sin = _cos_sin(torch.arange(64), D)
    q, k = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, S, 1, D, dtype=dtype)
    per_tok_cos, per_tok_sin = _cos_sin(pos, D)
    q_ref, k_ref = _hf_rope(q.double(), k.double(), per_tok_cos.double(), per_tok_sin.double())
    q_out, k_out = rope_(q.clone(), k.clone(), table_cos, table_sin, position_ids=pos)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)
    # tokens where a packed sequence restarts sit at position 0: the rotation is the identity there
    for b, t in ((0, 0), (0, 3), (0, 7), (1, 0)):
        assert_close(q_out[b, t], q[b, t], dtype)
    assert (q_out[0, 4] - q[0, 4]).abs().max() > 0


def test_partial_rotary_dims_pass_through():
    B, S, H, D, rot = 1, 4, 2, 32, 16
    q, k = torch.randn(B, S, H, D), torch.randn(B, S, H, D)
    cos, sin = _cos_sin(torch.arange(S)[None], rot)
    q_ref, k_ref = rope_reference(q, k, cos, sin)
    q2, k2 = rope_(q.clone(), k.clone(), cos, sin)
    assert_close(q2, q_ref, torch.float32)
    assert torch.equal(q2[..., rot:], q[..., rot:])
