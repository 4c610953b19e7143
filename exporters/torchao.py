"""TorchAO export: the converted model saved by transformers' own torchao serializer, reload-checked.

The output directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` (torchao installed) into the
same quantized tensors the evaluator measured; before the directory appears, it is reloaded and its logits
must equal the converted model's exactly (same integers, same scales, same kernels).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir

# a few fixed token sequences; logits must match bit for bit after the round trip
_PROBE_LEN = 24


def _probe_ids(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, _PROBE_LEN), generator=g)


def export(src: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``out_dir`` (config, safetensors, tokenizer, scheme.json) from a converted directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.qat.convert import load_converted, write_converted

    src, out_dir = Path(src), Path(out_dir)
    t0 = time.perf_counter()
    model, tokenizer, record = load_converted(src)
    ids = _probe_ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with atomic_dir(out_dir) as tmp:
        write_converted(model, tokenizer, record, tmp)
        again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        AutoTokenizer.from_pretrained(str(tmp))
        with torch.no_grad():
            got = again(input_ids=ids).logits
        max_diff = float((got - ref).abs().max())
        if max_diff != 0.0:
            raise EdgeftError(
                f"torchao export: reloaded logits differ from the converted model (max |diff| {max_diff:.3g})"
            )
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    return {
        "name": "torchao",
        "path": str(out_dir),
        "bytes": size,
        "scheme": (record.get("plan") or {}).get("name"),
        "validation": {"reload_max_abs_diff": max_diff},
        "seconds": round(time.perf_counter() - t0, 2),
    }
