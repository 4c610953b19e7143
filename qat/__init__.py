"""Quantization-aware training: schemes as data, prepare (fake-quant), convert (real quantized tensors), PTQ."""
