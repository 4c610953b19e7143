"""Training with the fused kernels learns exactly what training without them learns (CPU: Triton interpreter).

Runs the real loop (fused AdamW) so that anything cached across steps inside the kernels must follow the
optimizer's updates.
"""

import json

import pytest

from edgeft.config import TrainConfig
from edgeft.kernels._common import interpreting


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py on CPU)")
@pytest.mark.parametrize("qat", [None])
def test_lora_with_kernels_matches_without(tmp_path, qat):
    from edgeft import pipeline

    losses = {}
    for kernels in ("on", "off"):
        cfg = TrainConfig(model="tiny-qwen3", mode="lora", qat=qat, ptq=False, max_steps=4, batch_size=4, lr=5e-3,
                          warmup_ratio=0.0, kernels=kernels, out=str(tmp_path / kernels), progress=False)
        run = pipeline.train(cfg)
        losses[kernels] = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    on, off = losses["on"], losses["off"]
    assert off[-1] < off[0] - 0.05  # the run learns
    assert on == pytest.approx(off, rel=2e-3), (on, off)
