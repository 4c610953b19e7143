"""Resumable checkpoints: ``checkpoints/step-N/`` holds everything that decides what training does next.

- Atomic: a checkpoint is written into a hidden temporary sibling and renamed into place, so a run killed at any
  moment (SIGKILL included) leaves the previous checkpoint or the new one, never half of one.
- Contents: the trainable tensors and QAT buffers by name (``trainable.safetensors``; the frozen base is rebuilt,
  not copied), the LoRA adapter in PEFT's format (``adapter/``), optimizer, scheduler and every rank's RNG states
  (loaded with ``weights_only=True``), and ``state.json`` (written last: step, sampler position, best eval loss,
  the config fingerprint and tensor shapes, checked before anything is loaded).
- A checkpoint's tensors and adapter do not depend on how many processes (FSDP2 included) wrote it.
- ``save_total_limit`` keeps the newest K checkpoints and never deletes the best one (lowest eval loss).

Layout details and FSDP2: docs/training.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgeft.config import flat_keys
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_dir
from edgeft.rundir import CHECKPOINT_STATE

_NAME = re.compile(r"^step-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, and QAT fake-quantizer buffers, as CPU tensors by name."""
    out = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for n, b in model.named_buffers():
        if "fake_quantizer" in n and b is not None:
            out[n] = b.detach().to("cpu", copy=True).contiguous()
    return out


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into the model in place; a missing or reshaped tensor is one clear error."""
    live = dict(model.named_parameters())
    live.update({n: b for n, b in model.named_buffers() if "fake_quantizer" in n})
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(tensors))
    unknown = sorted(set(tensors) - set(live))
    if missing or unknown:
        raise EdgeftError(
            f"{where} does not match this model: missing {missing[:3]}, unexpected {unknown[:3]} "
            "(resume with the configuration the run was started with)"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            if live[n].shape != t.shape:
                raise EdgeftError(f"{where}: {n} has shape {tuple(t.shape)}, the model {tuple(live[n].shape)}")
            live[n].copy_(t.to(live[n].device, live[n].dtype))


def rng_state() -> dict[str, Any]:
    import numpy as np

    st = np.random.get_state()
    out: dict[str, Any] = {
        "python": random.getstate(),
        # int64, not numpy's uint32: torchrun gathers these states with all_gather_object, whose pickling of a
        # uint32 tensor does not load back ("UntypedStorage has no attribute dtype")
        "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a state.json) under ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and (p / CHECKPOINT_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def fingerprint_diff(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """The differing keys (nested ones as "lora.r"). A key one side lacks counts as its value in ``defaults``
    (flattened the same way): a checkpoint written before the key existed matches a run that leaves it at that."""
    a, b, d = flat_keys(saved), flat_keys(current), defaults or {}
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k, d.get(k))!r} -> {b.get(k, d.get(k))!r}"
        for k in keys
        if a.get(k, d.get(k)) != b.get(k, d.get(k))
    ]


def _shallow_check(f: Path) -> None:
    """Raise if ``f`` is visibly damaged: a safetensors header that does not match the size, a .pt (zip) whose
    directory cannot be read."""
    if f.suffix == ".safetensors":
        from edgeft.integrity import safetensors_problem

        why = safetensors_problem(f)
        if why:
            raise ValueError(why)
    elif f.suffix == ".pt":
        import zipfile

        with zipfile.ZipFile(f):  # torch.save writes a zip: its directory sits at the end, so truncation shows
            pass


class CheckpointManager:
    """Writes, rotates and reads ``step-N`` checkpoints of one training variant."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = None,
        fingerprint: dict | None = None,
        save_adapter: Callable[[Path], None] | None = None,
        defaults: dict | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.keep = keep
        self.fingerprint = fingerprint or {}
        self.defaults = defaults or {}  # the fingerprint keys' defaults (fingerprint_diff)
        self.save_adapter = save_adapter

    def clean_partial(self) -> None:
        """Remove what an interrupted write or rotation left behind (hidden temporary directories)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Path | None:
        found = list_checkpoints(self.dir)
        return found[-1][1] if found else None

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step}"

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: dict[str, Any],
        rng_states: list[dict[str, Any]],
        tensors: dict[str, torch.Tensor] | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write ``step-N``; ``tensors``/``optimizer_state``: gathered ones for a sharded model (FSDP)."""
        from safetensors.torch import save_file

        dest = self.path(step)
        sharded = tensors is not None
        tensors = trainable_state(model) if tensors is None else tensors
        with atomic_dir(dest) as tmp:
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            if self.save_adapter is not None:
                if sharded:
                    self.save_adapter(tmp / "adapter", tensors)
                else:
                    self.save_adapter(tmp / "adapter")
            # each file's size: a truncated file is named on resume before anything is parsed
            sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            meta = dict(
                state,
                step=step,
                fingerprint=self.fingerprint,
                shapes={n: list(t.shape) for n, t in tensors.items()},
                sizes=sizes,
            )
            (tmp / CHECKPOINT_STATE).write_text(json.dumps(meta, indent=2) + "\n")
        self.rotate(state.get("best_step"))
        return dest

    def rotate(self, best_step: int | None) -> None:
        if not self.keep:
            return
        found = list_checkpoints(self.dir)
        doomed = [(s, p) for s, p in found[: max(0, len(found) - self.keep)] if s != best_step]
        for _, p in doomed:
            old = p.with_name(f".{p.name}.old-{os.getpid()}")
            os.replace(p, old)  # disappears as a whole first, so it never looks like a valid checkpoint
            shutil.rmtree(old, ignore_errors=True)

    def _corrupt(self, file: Path, why: str) -> EdgeftError:
        """The error for a damaged checkpoint file: it names the file and the checkpoint to fall back on."""
        step = int(_NAME.match(file.parent.name).group(1)) if _NAME.match(file.parent.name) else None
        earlier = [p for s, p in list_checkpoints(self.dir) if step is not None and s < step]
        offer = (
            f"remove {file.parent} to resume from {earlier[-1].name}"
            if earlier
            else "it is the only checkpoint: remove it to resume from the start, or train again with --overwrite"
        )
        return EdgeftError(f"checkpoint file {file} is damaged ({why}); {offer}")

    def _read(
        self, file: Path, reader: Callable[[Path], Any], sizes: dict[str, int] | None = None, key: str | None = None
    ) -> Any:
        """``reader(file)``, any failure to parse (truncation, garbage) reported as :meth:`_corrupt`; ``sizes``: the
        sizes state.json recorded, by ``key`` (default the file's name)."""
        want = (sizes or {}).get(key or file.name)
        if not file.is_file():
            raise self._corrupt(file, "missing")
        if want is not None and file.stat().st_size != want:
            raise self._corrupt(file, f"{file.stat().st_size} bytes, {want} were written")
        try:
            return reader(file)
        except EdgeftError:
            raise
        except Exception as e:  # safetensors, zip, pickle and json each raise their own types
            raise self._corrupt(file, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}") from None

    def verify_latest(self) -> None:
        """Check the newest checkpoint's files without loading them (recorded sizes, safetensors headers, the zip
        directory of each .pt), so that a damaged one is refused before the run loads a model."""
        latest = self.latest()
        if latest is None:
            return
        state = self._read(latest / CHECKPOINT_STATE, lambda f: json.loads(f.read_text()))
        sizes = state.get("sizes") if isinstance(state, dict) else None
        for f in sorted(p for p in latest.rglob("*") if p.is_file() and p.name != CHECKPOINT_STATE):
            self._read(f, _shallow_check, sizes, f.relative_to(latest).as_posix())

    def read_state(self, path: Path) -> dict[str, Any]:
        state = self._read(path / CHECKPOINT_STATE, lambda f: json.loads(f.read_text()))
        diff = fingerprint_diff(state.get("fingerprint", {}), self.fingerprint, self.defaults)
        if diff:
            raise EdgeftError(f"{path} was written by a different configuration ({'; '.join(diff[:4])})")
        return state

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        rank: int = 0,
        sharded: Any = None,
    ) -> dict[str, Any]:
        """Restore model tensors, optimizer, scheduler and this rank's RNG from ``path``; returns its state.

        ``sharded``: the model's :class:`~edgeft.training.fsdp.Sharded` (FSDP); rank 0 reads the full tensors and
        optimizer state, every other rank receives its shards from it (no rank but 0 holds them whole).
        """
        from safetensors.torch import load_file

        state = self.read_state(path)
        sizes = state.get("sizes")

        def tload(f: Path) -> Any:
            return torch.load(f, map_location="cpu", weights_only=True)

        def tensors_of(f: Path) -> dict[str, torch.Tensor]:
            return load_file(str(f))

        if sharded is not None:
            read = rank == 0
            tensors = self._read(path / "trainable.safetensors", tensors_of, sizes) if read else {}
            optim_state = self._read(path / "optimizer.pt", tload, sizes) if read else {}
            sharded.load(tensors, str(path))
            sharded.load_optimizer(optimizer, optim_state)
        else:
            tensors = self._read(path / "trainable.safetensors", tensors_of, sizes)
            optim_state = self._read(path / "optimizer.pt", tload, sizes)
            load_trainable(model, tensors, str(path))
            optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(self._read(path / "scheduler.pt", tload, sizes))
        rngs = self._read(path / "rng.pt", tload, sizes)
        if rank >= len(rngs):
            raise EdgeftError(f"{path} was written by {len(rngs)} process(es); resume with the same number")
        set_rng_state(rngs[rank])
        return state

    def load_tensors(self, step: int, read: bool = True) -> dict[str, torch.Tensor] | None:
        """The trainable tensors of checkpoint ``step`` (None: there is none); ``read=False``: {} if it exists
        (FSDP ranks other than 0, which get their shards from rank 0's)."""
        from safetensors.torch import load_file

        p = self.path(step) / "trainable.safetensors"
        if not p.exists():
            return None
        return self._read(p, lambda f: load_file(str(f))) if read else {}
