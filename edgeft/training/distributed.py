"""Several processes, one model: data parallelism under ``torchrun --nproc_per_node N -m edgeft train ...``.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; each process trains a replica on its slice of every global batch
(``batch_size`` examples per process) and DDP averages gradients during backward. The loss of each micro-batch is its
summed token loss divided by the target-token count of the *whole* window across all processes (an all-reduce), times
the world size to undo DDP's averaging, so N processes at batch B compute exactly the gradient of one process at batch
N*B. Only rank 0 writes files; every rank keeps the same RNG-free data order (a pure function of seed and epoch).
NCCL on CUDA, gloo on CPU (what the CPU test uses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[DistInfo | None, str]:
    """Join the process group torchrun describes (if any); returns (info or None, this process's device)."""
    if env_world_size() <= 1:
        return None, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=torch.device(device) if backend == "nccl" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend), device


def all_reduce_sum(values: list[float], info: DistInfo | None, device: str) -> list[float]:
    if info is None:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo | None) -> None:
    if info is not None:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj: Any, info: DistInfo | None) -> list[Any]:
    """Every rank's ``obj`` (on every rank)."""
    if info is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo | None) -> Any:
    if info is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo | None) -> None:
    if info is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
