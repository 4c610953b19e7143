import pytest
import torch
from torch import nn

from edgeft.kernels.checkpoint import OffloadChain, checkpoint_layer


class Block(nn.Module):
    def __init__(self, d=16, p=0.0):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("mode", ["plain", "offload"])  # offload acts as plain off CUDA
def test_checkpointed_stack_gives_same_grads(mode):
    blocks = nn.ModuleList(Block() for _ in range(3))
    x = torch.randn(4, 16, requires_grad=True)

    def run(use_ckpt):
        for p in blocks.parameters():
            p.grad = None
        x.grad = None
        h, chain = x, OffloadChain()
        for b in blocks:
            h = checkpoint_layer(b, h, mode, chain) if use_ckpt else b(h)
        h.square().sum().backward()
        return [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b)


def test_input_without_grad_still_reaches_parameters():
    # under LoRA the embedding output needs no grad; the first layer's parameters must still get theirs
    b = Block()
    x = torch.randn(3, 16)
    checkpoint_layer(b, x, "plain").sum().backward()
    assert b.lin.weight.grad is not None


def test_dropout_is_replayed_identically():
    b = Block(p=0.5)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    checkpoint_layer(b, x, "plain", preserve_rng=True).sum().backward()
    g1 = b.lin.weight.grad.clone()
    b.lin.weight.grad = None
    torch.manual_seed(3)
    b(x).sum().backward()
    torch.testing.assert_close(g1, b.lin.weight.grad)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError):
        checkpoint_layer(Block(), torch.randn(2, 16), "disk")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_inputs_to_pinned_host_memory():
    blocks = nn.ModuleList(Block(256) for _ in range(4)).cuda()
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    chain = OffloadChain()
    h = x
    for b in blocks:
        h = checkpoint_layer(b, h, "offload", chain)
    recs = [r() for r in chain.records]
    assert len(recs) == 4 and all(r.cpu.is_pinned() for r in recs)
    h.sum().backward()
    g = [p.grad.clone() for p in blocks.parameters()]
    for p in blocks.parameters():
        p.grad = None
    h = x
    for b in blocks:
        h = b(h)
    h.sum().backward()
    for a, b_ in zip(g, [p.grad for p in blocks.parameters()]):
        torch.testing.assert_close(a, b_)
