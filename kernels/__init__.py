"""Fused Triton kernels for training: one file per op (Triton kernel + PyTorch reference + autograd.Function)."""
