"""Exporters: ExecuTorch .pte, GGUF, TorchAO; each validates its artifact on the host runtime."""
