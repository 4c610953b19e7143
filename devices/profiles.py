"""Device profiles as data, and the fit check: will this artifact run on that phone, and how fast?

A profile holds what decides on-device LLM inference: the memory an app may actually use (far below the
phone's RAM: the OS and the low-memory killer take the rest), memory bandwidth (decode reads every weight
once per token, so it is bandwidth-bound), CPU cores, the backends available, and published decode
measurements where they exist. Adding a phone is a new entry in ``PROFILES``.

The check estimates:
- runtime memory = artifact bytes (weights are mmapped/loaded whole) + KV cache at the requested context
  + logits and activations + a fixed runtime overhead;
- decode time per token = bytes read per token (weights + KV cache) / (bandwidth × efficiency) + a fixed
  per-layer dispatch cost, as a range over the efficiencies CPU decoding reaches in practice; a published
  measurement of a similar model is shown beside it when the profile has one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError
from edgeft.rundir import Exports, RunDir

GiB = 2**30


@dataclass(frozen=True)
class KnownDecode:
    """A published decode-speed measurement on this device."""

    model: str
    params_m: float
    quant: str
    runtime: str
    tokens_per_s: float
    source: str


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_gib: float
    app_memory_gib: float  # what one app can hold before the OS kills it
    bandwidth_gbs: float  # peak DRAM bandwidth, GB/s
    cpu_cores: int
    backends: tuple[str, ...]
    efficiency: tuple[float, float] = (0.25, 0.55)  # share of peak bandwidth CPU decode reaches
    layer_overhead_ms: float = 0.1  # per-layer operator dispatch and synchronisation per token
    known: tuple[KnownDecode, ...] = field(default_factory=tuple)
    notes: str = ""


_QWEN3_06B_PHONE = "Qwen3-0.6B, 8da4w .pte: ~40 tok/s (Unsloth x ExecuTorch phone-deployment guide, 2025)"

PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in [
        DeviceProfile(
            "pixel-8",
            "Google Pixel 8 (Tensor G3, 1+4+4 cores, 8 GB LPDDR5X)",
            ram_gib=8,
            app_memory_gib=3.0,
            bandwidth_gbs=68.3,
            cpu_cores=9,
            backends=("xnnpack", "vulkan", "llama.cpp"),
            known=(KnownDecode("Qwen3-0.6B", 600, "8da4w", "executorch-xnnpack", 40.0, _QWEN3_06B_PHONE),),
        ),
        DeviceProfile(
            "iphone-15-pro",
            "Apple iPhone 15 Pro (A17 Pro, 2+4 cores, 8 GB LPDDR5)",
            ram_gib=8,
            app_memory_gib=3.0,
            bandwidth_gbs=51.2,
            cpu_cores=6,
            backends=("xnnpack", "coreml", "mps", "llama.cpp"),
            known=(KnownDecode("Qwen3-0.6B", 600, "8da4w", "executorch-xnnpack", 40.0, _QWEN3_06B_PHONE),),
            notes="apps with the increased-memory-limit entitlement may use about 5 GB",
        ),
        DeviceProfile(
            "galaxy-s24",
            "Samsung Galaxy S24 (Exynos 2400 / Snapdragon 8 Gen 3, 8 GB LPDDR5X)",
            ram_gib=8,
            app_memory_gib=3.0,
            bandwidth_gbs=76.8,
            cpu_cores=10,
            backends=("xnnpack", "qnn", "vulkan", "llama.cpp"),
        ),
        DeviceProfile(
            "raspberry-pi-5",
            "Raspberry Pi 5, 8 GB (BCM2712, 4x Cortex-A76, 32-bit LPDDR4X-4267)",
            ram_gib=8,
            app_memory_gib=6.5,
            bandwidth_gbs=17.1,
            cpu_cores=4,
            backends=("xnnpack", "llama.cpp"),
            efficiency=(0.3, 0.6),
            layer_overhead_ms=0.25,
        ),
        DeviceProfile(
            "android-4gb",
            "A generic 4 GB Android phone (8x Cortex-A55 class, LPDDR4X)",
            ram_gib=4,
            app_memory_gib=1.2,
            bandwidth_gbs=14.9,
            cpu_cores=8,
            backends=("xnnpack", "llama.cpp"),
            efficiency=(0.2, 0.45),
            layer_overhead_ms=0.3,
        ),
    ]
}

RUNTIME_OVERHEAD_BYTES = 64 * 2**20  # runtime, tokenizer, allocator slack


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise EdgeftError(f"unknown device {name!r}; known devices: {', '.join(PROFILES)}")
    return PROFILES[name]


def _config_of(artifact: Path) -> dict[str, Any]:
    """Model shape for the KV-cache estimate: from the run's config.json beside the artifact, or GGUF metadata."""
    run = RunDir.of_artifact(artifact)
    for cand in [artifact.parent / "config.json"] + ([run.converted / "config.json"] if run is not None else []):
        if cand.exists():
            return shape_of_config(json.loads(cand.read_text()))
    if artifact.suffix == ".gguf":
        return _gguf_shape(artifact)
    raise EdgeftError(f"cannot tell the model shape of {artifact}: no config.json beside it")


def _gguf_shape(path: Path) -> dict[str, Any]:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise EdgeftError("reading a GGUF's shape needs the 'gguf' package") from e
    r = GGUFReader(str(path))
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def val(key: str) -> int:
        f = r.fields[f"{arch}.{key}"]
        return int(f.parts[-1][0])

    heads = val("attention.head_count")
    kv = val("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in r.fields else heads
    hidden = val("embedding_length")
    head_dim = val("attention.key_length") if f"{arch}.attention.key_length" in r.fields else hidden // heads
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    return {"layers": val("block_count"), "kv_heads": kv, "head_dim": head_dim, "vocab": vocab, "hidden": hidden}


def _program_kv_cache(artifact: Path) -> dict[str, Any] | None:
    """The KV cache a ``.pte`` really holds, from the export's record in ``manifest.json`` beside it (edgeft's
    exporter writes it: rows per layer type, bytes), or None for other files."""
    manifest = Exports(artifact.parent).manifest
    if artifact.suffix != ".pte" or not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text()).values()
    except (OSError, ValueError, AttributeError):
        return None
    for e in entries:
        if isinstance(e, dict) and Path(str(e.get("path", ""))).name == artifact.name and e.get("kv_cache"):
            return e["kv_cache"]
    return None


def shape_of_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model shape the estimates need, from a transformers ``config.json`` mapping."""
    heads = cfg["num_attention_heads"]
    return {
        "layers": cfg["num_hidden_layers"],
        "kv_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "vocab": cfg["vocab_size"],
        "hidden": cfg["hidden_size"],
    }


def kv_cache_bytes(shape: dict[str, Any], context: int, kv_bytes: float) -> int:
    """Keys and values of every layer at ``context`` positions, ``kv_bytes`` per element."""
    return int(2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * context * kv_bytes)


def estimate(profile: DeviceProfile, size: int, kv: int, shape: dict[str, Any]) -> dict[str, Any]:
    """Runtime memory and decode range of an artifact of ``size`` bytes with a ``kv``-byte cache (module docstring):
    what ``check`` reports for a file and the device-fit planner (``edgeft.qat.plan``) predicts for a plan."""
    activations = 4 * (shape["vocab"] + 8 * shape["hidden"]) * 2  # logits + a few hidden-size buffers
    memory = size + kv + activations + RUNTIME_OVERHEAD_BYTES
    budget = profile.app_memory_gib * GiB
    per_token = size + kv / 2  # on average half the cache is filled during a generation
    fixed = shape["layers"] * profile.layer_overhead_ms / 1e3
    lo, hi = (1.0 / (per_token / (profile.bandwidth_gbs * 1e9 * e) + fixed) for e in profile.efficiency)
    return {
        "memory": memory,
        "budget": budget,
        "fits": memory <= budget,
        "decode_tokens_per_s": [round(lo, 1), round(hi, 1)],
        "decode_low": lo,
    }


def check(
    profile: DeviceProfile, artifact: str | Path, context: int = 2048, kv_bytes: int | None = None
) -> dict[str, Any]:
    """Fit verdict and speed estimate of an artifact (.pte or .gguf) on a device profile.

    A ``.pte`` that edgeft exported carries its KV cache in the program (allocated whole at load, at the export's
    ``max_context_len``; Gemma3's sliding-window layers as a shorter ring): that cache is used, from the export's
    ``manifest.json``, instead of the uniform estimate at ``context``."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise EdgeftError(f"artifact not found: {artifact}")
    shape = _config_of(artifact)
    size = artifact.stat().st_size
    if kv_bytes is None:
        kv_bytes = 4 if artifact.suffix == ".pte" else 2  # ExecuTorch's cache is fp32; llama.cpp's f16
    program_kv = _program_kv_cache(artifact) if kv_bytes == 4 else None
    if program_kv:
        kv, context = int(program_kv["bytes"]), int(program_kv["context_rows"])
    else:
        kv = kv_cache_bytes(shape, context, kv_bytes)
    est = estimate(profile, size, kv, shape)
    memory, budget, fits = est["memory"], est["budget"], est["fits"]
    lo, hi = est["decode_tokens_per_s"]
    return {
        "device": profile.name,
        "artifact": str(artifact),
        "artifact_mb": size / 2**20,
        "context": context,
        "kv_cache_mb": kv / 2**20,
        "kv_cache_source": "program" if program_kv else "estimate",
        "runtime_memory_mb": memory / 2**20,
        "app_memory_budget_mb": budget / 2**20,
        "fits": fits,
        "headroom_mb": (budget - memory) / 2**20,
        "decode_tokens_per_s": [lo, hi],
        "known": [asdict(k) for k in profile.known],
        "verdict": (
            f"fits on {profile.name}: {memory / 2**20:.0f} MB of {budget / 2**20:.0f} MB at {context} tokens of context"
            if fits
            else f"does NOT fit on {profile.name}: needs {memory / 2**20:.0f} MB, "
            f"an app may use {budget / 2**20:.0f} MB"
        ),
    }
