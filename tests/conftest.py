"""Test settings: CPU-only runs use Triton's interpreter and one torch thread (faster on 2 cores)."""

import os
from pathlib import Path

# built-in models are materialised once per checkout, not in the user's cache
os.environ.setdefault("EDGEFT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "edgeft"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
