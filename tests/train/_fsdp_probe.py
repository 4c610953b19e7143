"""``torchrun ... tests/train/_fsdp_probe.py train ...``: ``python -m edgeft`` that records, per rank, what the model
loading and sharding did, into ``$EDGEFT_PROBE_DIR/rank<N>.json`` (read by test_fsdp.py):

- ``from_pretrained``: every transformers model loaded from a checkpoint (path);
- ``fully_shard``: for every ``fully_shard`` call, the bytes of the module's parameters that are materialised and
  not yet sharded at that moment (whole tensors in this process), and the largest such tensor;
- ``reads``: the checkpoint files (``trainable.safetensors``, ``optimizer.pt``) it read;
- ``loaded``: after every :func:`edgeft.training.fsdp.load_from_rank0`, the module's non-persistent buffers (values)
  and whether any tensor is still on the meta device.
"""

import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed.fsdp as tfsdp
import transformers
from torch.distributed.tensor import DTensor

import edgeft.training.fsdp as efsdp
from edgeft.cli import main

RANK = int(os.environ["RANK"])
REC: dict = {"from_pretrained": [], "fully_shard": [], "loaded": [], "reads": []}

_from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__


def _probe_from_pretrained(cls, path, *args, **kwargs):
    REC["from_pretrained"].append(str(path))
    return _from_pretrained(cls, path, *args, **kwargs)


transformers.PreTrainedModel.from_pretrained = classmethod(_probe_from_pretrained)

_load_file, _torch_load = safetensors.torch.load_file, torch.load


def _probe_load_file(path, *args, **kwargs):
    REC["reads"].append(Path(path).name)
    return _load_file(path, *args, **kwargs)


def _probe_torch_load(f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and Path(f).name == "optimizer.pt":
        REC["reads"].append("optimizer.pt")
    return _torch_load(f, *args, **kwargs)


safetensors.torch.load_file, torch.load = _probe_load_file, _probe_torch_load

_fully_shard = tfsdp.fully_shard


def _probe_fully_shard(module, *args, **kwargs):
    whole = [p for p in module.parameters() if not p.is_meta and not isinstance(p, DTensor)]
    REC["fully_shard"].append(
        {
            "module": type(module).__name__,
            "whole_bytes": sum(p.numel() * p.element_size() for p in whole),
            "largest": max((p.numel() for p in whole), default=0),
        }
    )
    return _fully_shard(module, *args, **kwargs)


tfsdp.fully_shard = _probe_fully_shard

_load_from_rank0 = getattr(efsdp, "load_from_rank0", None)  # absent before ranks other than 0 built on meta


def _probe_load(module, full, device):
    _load_from_rank0(module, full, device)
    bufs = {
        f"{mn}.{leaf}": b.detach().cpu().float().tolist()
        for mn, m in module.named_modules()
        for leaf, b in m._buffers.items()
        if b is not None and leaf in m._non_persistent_buffers_set
    }
    meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())
    total = sum(p.numel() for p in module.parameters())
    REC["loaded"].append(
        {"module": type(module).__name__, "buffers": bufs, "meta": meta, "local_params": local, "params": total}
    )


if _load_from_rank0 is not None:
    efsdp.load_from_rank0 = _probe_load

if __name__ == "__main__":
    try:
        rc = main(sys.argv[1:])
    finally:
        Path(os.environ["EDGEFT_PROBE_DIR"], f"rank{RANK}.json").write_text(json.dumps(REC))
    sys.exit(rc)
