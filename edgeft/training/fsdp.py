"""FSDP2 for models whose training state does not fit one GPU: ``--distributed fsdp`` under torchrun.

- Only rank 0 reads the weights (to the CPU); other ranks build the model on the meta device; LoRA, kernels and
  QAT are applied as for one process, then every decoder layer and the root are sharded and filled from rank 0.
  A rank holds at most its shards plus one layer whole (rank 0 also the host copy until loading is done).
- FSDP computes what one GPU computes: the sharded weights keep the one-process dtypes, bf16 runs keep fp32
  masters of their shards, gradients are reduce-scattered in fp32 and averaged like DDP, clipping reduces the norm
  over the shards; a distillation teacher is sharded the same way.
- Checkpoints and the saved model are written as for one process (gathered on rank 0); ``--resume`` gives every
  rank its shards back. bitsandbytes does not shard: one clear error at start.
- ``auto`` picks DDP unless the estimated per-GPU DDP footprint exceeds half a GPU's memory; CPU (gloo) runs use
  DDP.

How each of these is done: docs/training.md.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeft.errors import EdgeftError
from edgeft.kernels.patch import transformers_model

log = logging.getLogger("edgeft")

STRATEGIES = ("auto", "ddp", "fsdp")
AUTO_FSDP_SHARE = 0.5  # auto: FSDP when the DDP estimate exceeds this share of one GPU's memory


def check_supported(cfg: Any) -> None:
    """One clear error line for what FSDP2 cannot shard (before any model work)."""
    if cfg.model.load_in_4bit or cfg.model.load_in_8bit:
        raise EdgeftError(
            "--distributed fsdp cannot shard a bitsandbytes 4-/8-bit base (its packed weights are "
            "not plain tensors); use --distributed ddp: a quantized base usually fits one GPU"
        )
    if cfg.optim.optimizer in ("adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        raise EdgeftError(
            f"--distributed fsdp cannot use --optim {cfg.optim.optimizer}: bitsandbytes' optimizers "
            "do not update sharded (DTensor) parameters; use adamw or sgd"
        )


def _checkpoint_params(model_dir: Path) -> int | None:
    """Parameter count from the safetensors headers (no tensor is read); None when there are none."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = st.get_slice(k).get_shape()
                n += int(torch.Size(shape).numel())
    return n


def ddp_bytes_estimate(n_params: int, cfg: Any) -> int:
    """What DDP keeps per GPU besides activations: weights, and for trained weights their gradient, DDP's bucket
    copy of it and AdamW's two moments (in the weights' dtype; bf16 weights with fp32 masters: an fp32 master and
    fp32 moments, precision.py); LoRA adapters are negligible."""
    from .precision import update_state_bytes

    elem = 2 if cfg.hardware.dtype == "bf16" else 4
    trained = n_params if cfg.model.mode == "full" else 0
    bucket = trained * elem
    # "master": the pipeline's update (Optimization's default); bf16_update is an API-only knob, not a config field
    return n_params * elem + bucket + update_state_bytes(trained * elem, cfg.hardware.dtype, "master")


def choose(cfg: Any, model_dir: Path, world: int, device: str) -> str:
    """The strategy of this run: "ddp" or "fsdp" (see the module docstring for ``auto``)."""
    want, m = cfg.hardware.distributed or "auto", cfg.model
    if want == "fsdp":
        check_supported(cfg)
        return "fsdp"
    if (
        want == "ddp"
        or world <= 1
        or not device.startswith("cuda")
        or m.load_in_4bit
        or m.load_in_8bit
        or cfg.optim.optimizer not in ("adamw", "sgd")
    ):  # bitsandbytes: DDP only
        return "ddp"
    n = _checkpoint_params(model_dir)
    if n is None:
        return "ddp"
    need = ddp_bytes_estimate(n, cfg)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    strategy = "fsdp" if need > AUTO_FSDP_SHARE * total else "ddp"
    log.info(
        "--distributed auto: %s (%.1f GiB of weights/gradients/optimizer per GPU under DDP, GPU %.0f GiB)",
        strategy,
        need / 2**30,
        total / 2**30,
    )
    return strategy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' ``_no_split_modules`` classes (the decoder layers)."""
    inner = transformers_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        stack = getattr(getattr(inner, "model", None), "layers", None)
        layers = list(stack) if isinstance(stack, nn.ModuleList) else []
    if not layers:
        raise EdgeftError(f"--distributed fsdp: no decoder layers found in {type(inner).__name__} to shard")
    return layers


def _check_uniform_trained_dtype(model: nn.Module, layers: list[nn.Module]) -> None:
    """FSDP2 reduces each shard group's gradients in one buffer: the trained parameters of a layer (and of the rest,
    the root) must share a dtype. bf16 LoRA with ``modules_to_save`` trains fp32 adapters next to bf16 copies."""
    in_layer = {id(p) for layer in layers for p in layer.parameters()}
    groups = [[p for p in layer.parameters() if p.requires_grad] for layer in layers]
    groups.append([p for p in model.parameters() if p.requires_grad and id(p) not in in_layer])
    for g in groups:
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in g})
        if len(dtypes) > 1:
            raise EdgeftError(
                f"--distributed fsdp: one shard group would train parameters in {' and '.join(dtypes)} "
                "(bf16 modules_to_save next to fp32 LoRA adapters?); FSDP2 needs one dtype per group: "
                "use --dtype fp32 or --distributed ddp"
            )


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _host_state(module: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Rank 0's weights before sharding (references, not copies), the source :func:`load_from_rank0` broadcasts;
    {} on the other ranks, which must not hold any."""
    if rank != 0:
        return {}
    if _has_meta(module):
        raise EdgeftError("--distributed fsdp: rank 0 must load the weights (its model has meta tensors)")
    return module.state_dict()


def load_from_rank0(module: nn.Module, full: dict[str, torch.Tensor], device: str) -> None:
    """Fill a sharded ``module`` on every rank from rank 0's whole tensors ``full`` (``{}`` on other ranks).

    Meta tensors (ranks that built the module without weights) are first allocated on ``device`` (``to_empty``);
    ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` then broadcasts one tensor at a
    time and each rank keeps its shard; non-persistent buffers, in no state dict, are broadcast from rank 0 too
    (rank 0's dtype wins: a teacher is cast after loading). A collective: every rank calls it, in the same order.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if _has_meta(module):
        module.to_empty(device=torch.device(device))
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _broadcast_buffers(module, device)


def _broadcast_buffers(module: nn.Module, device: str) -> None:
    """Rank 0's non-persistent buffers (rotary ``inv_freq``, ...) into every rank's module, in rank 0's dtype."""
    import torch.distributed as dist

    slots = [
        (mod, leaf)
        for _, mod in module.named_modules()
        for leaf, b in mod._buffers.items()  # noqa: SLF001
        if b is not None and leaf in mod._non_persistent_buffers_set
    ]  # noqa: SLF001
    box = [[(tuple(mod._buffers[leaf].shape), mod._buffers[leaf].dtype) for mod, leaf in slots]]  # noqa: SLF001
    dist.broadcast_object_list(box, src=0)
    if len(box[0]) != len(slots):
        raise EdgeftError(
            f"--distributed fsdp: rank 0's model has {len(box[0])} non-persistent buffers, this "
            f"rank's {len(slots)}: the ranks built different models"
        )
    rank0 = dist.get_rank() == 0
    for (mod, leaf), (shape, dtype) in zip(slots, box[0]):
        own = mod._buffers[leaf]  # noqa: SLF001
        t = own.detach().to(device) if rank0 else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        mod._buffers[leaf] = t  # noqa: SLF001


class Sharded:
    """A model sharded with FSDP2 inside its loss wrapper, and the collective state-dict operations on it.

    The weights come from rank 0 (:func:`load_from_rank0`): the other ranks may pass a model built on the meta
    device. Every method that gathers or scatters is a collective: all ranks call it, in the same order.
    """

    def __init__(self, wrapper: nn.Module, model: nn.Module, device: str, rank: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.wrapper, self.model, self.rank, self.device = wrapper, model, rank, device
        world = torch.distributed.get_world_size()
        self.mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
        trained = [p for p in model.parameters() if p.requires_grad]
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        full = all(p.requires_grad for p in model.parameters())
        # see the module docstring: compute in what one process computes in, reduce in fp32
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if (bf16 and full) else None, reduce_dtype=torch.float32 if bf16 else None
        )
        layers = decoder_layers(model)
        _check_uniform_trained_dtype(model, layers)
        full = _host_state(model, rank)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        fully_shard(wrapper, mesh=self.mesh, mp_policy=mp)
        load_from_rank0(model, full, device)
        del full  # rank 0's host copy: freed now that every rank holds its shards
        # ranks that built on meta drew no random numbers for LoRA's initialisation: continue with rank 0's
        # generator, as when every rank initialised the same model (dropout)
        box = [torch.get_rng_state() if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        torch.set_rng_state(box[0])
        self.trained_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if len(self.trained_names) != len(trained):
            raise EdgeftError("--distributed fsdp: sharding changed the trainable parameters")
        self._opts = None

    def shard_frozen(self, module: nn.Module) -> None:
        """Shard a frozen model (the distillation teacher) like the trained one, per decoder layer and root, and
        fill it from rank 0 (the other ranks may have built it on meta). It stays in eval mode without gradients;
        its forward all-gathers one layer at a time like the student's. A collective."""
        from torch.distributed.fsdp import fully_shard

        module.eval()
        module.requires_grad_(False)
        full = _host_state(module, self.rank)
        for layer in decoder_layers(module):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(module, mesh=self.mesh)
        load_from_rank0(module, full, self.device)

    def _options(self, **kw: Any):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(**kw)

    # -- model tensors -------------------------------------------------------------------------------------------
    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        return full_trainable_state(self.model)

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's shards of the trainable parameters (copies): the in-memory best weights."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load :meth:`local_state` shards (every rank its own) or full tensors into the model. Full tensors are
        rank 0's: the other ranks pass {} (or anything: ignored) and receive their shards from it."""
        from torch.distributed.tensor import DTensor

        live = dict(self.model.named_parameters())
        if tensors and all(isinstance(t, DTensor) for t in tensors.values()):
            self._check_names(tensors, live, where)
            with torch.no_grad():
                for n, t in tensors.items():
                    live[n].copy_(t)
            return
        problem = None
        if self.rank == 0:  # checked where the tensors are; every rank raises the same error
            try:
                self._check_names(tensors, live, where)
                for n, t in tensors.items():
                    if n in live and tuple(live[n].shape) != tuple(t.shape):
                        raise EdgeftError(f"{where}: {n} has shape {tuple(t.shape)}, the model {tuple(live[n].shape)}")
            except EdgeftError as e:
                problem = str(e)
        box = [problem]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise EdgeftError(box[0])
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(
            self.model,
            tensors if self.rank == 0 else {},
            options=self._options(full_state_dict=True, broadcast_from_rank0=True, strict=False),
        )

    def _check_names(self, tensors: dict[str, torch.Tensor], live: dict[str, Any], where: str) -> None:
        missing = sorted(set(self.trained_names) - set(tensors))
        unknown = sorted(n for n in tensors if n not in live and "fake_quantizer" not in n)
        if missing or unknown:
            raise EdgeftError(
                f"{where} does not match this model: missing {missing[:3]}, unexpected {unknown[:3]} "
                "(resume with the configuration the run was started with)"
            )

    # -- optimizer -----------------------------------------------------------------------------------------------
    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name, whole, on the CPU of rank 0 ({} elsewhere)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, opt, options=self._options(full_state_dict=True, cpu_offload=True))

    def load_optimizer(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load rank 0's whole optimizer state (from :meth:`optimizer_state`; other ranks pass {}): each rank
        keeps the shards of its parameters."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(
            self.model,
            opt,
            state if self.rank == 0 else {},
            options=self._options(full_state_dict=True, broadcast_from_rank0=True),
        )


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters (and QAT fake-quantizer buffers) of a sharded model gathered whole, on the CPU of rank 0
    ({} elsewhere); names as ``model.named_parameters()`` gives them, like :func:`checkpoint.trainable_state`.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )
    return {n: t.contiguous() for n, t in sd.items() if n in keep or "fake_quantizer" in n}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``clip_grad_norm_`` that also takes DTensor gradients (FSDP2): the norm is over all shards, as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
