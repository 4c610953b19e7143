"""The header every bench result records (package versions, the machine) and the results file's name, in one place
so that result files from different scripts describe their host alike.

Each script puts ``bench/`` on ``sys.path`` and imports it as ``from _common import device, versions``.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
# distributions named by their import name (importlib.metadata normalises "_" and "-"); absent ones are skipped
PACKAGES = (
    "torch",
    "triton",
    "torchao",
    "transformers",
    "peft",
    "accelerate",
    "executorch",
    "llama_cpp_python",
    "gguf",
    "liger_kernel",
    "flash_attn",
    "edgeft",
)
# CPU flags that decide which kernels ExecuTorch, llama.cpp and ATen pick
SIMD_FLAGS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        pass
    # a module installed under another distribution's name (e.g. triton from pytorch-triton)
    mod = {"llama_cpp_python": "llama_cpp"}.get(pkg, pkg)
    try:
        if importlib.util.find_spec(mod) is None:
            return None
        return str(getattr(__import__(mod), "__version__", None) or "") or None
    except Exception:  # noqa: BLE001  (a broken optional install is reported as absent, not fatal)
        return None


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python, the versions of the installed packages of ``PACKAGES`` + ``extra`` (absent ones skipped) and edgeft's
    git commit (``edgeft_commit``, when the checkout is a git repository)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES + tuple(extra):
        v = _version(pkg)
        if v is not None:
            out[pkg] = v
    try:
        out["edgeft_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=BENCH, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _gpu_driver() -> str | None:
    # one driver per host: nvidia-smi's first line (its GPU numbering ignores CUDA_VISIBLE_DEVICES)
    cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[0] if lines else None


def device() -> dict[str, object]:
    """The host: CPU model (/proc/cpuinfo), its core counts and SIMD flags, torch's thread count and
    ``ATEN_CPU_CAPABILITY``; with CUDA, the current GPU's name, compute capability, memory, SM count, CUDA runtime
    and driver version. ``cuda`` is the CUDA version, None without a GPU (scripts test it to name the device)."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    out: dict[str, object] = {
        "cpu": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": sorted(set(flags.group(1).split()) & SIMD_FLAGS) if flags else [],
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
        "name": "cpu",
        "cuda": None,
    }
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        out |= {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "driver": _gpu_driver(),
        }
    return out


def slug(text: str, n: int = 24) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as one "-", at most ``n`` characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")


def result_path(bench: str, tag: str = "", device: str | None = None) -> Path:
    """``bench/results/<bench>-<YYYYMMDD>-<device>[-<tag>].json`` (its folder created); ``device`` defaults to
    "gpu" when CUDA is available, else "cpu"."""
    if device is None:
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / (f"{bench}-{dt.date.today():%Y%m%d}-{device}" + (f"-{tag}" if tag else "") + ".json")


def header(bench: str) -> dict[str, object]:
    """The start of a result's JSON: the bench's name, the UTC date, :func:`device` and :func:`versions`."""
    return {
        "bench": bench,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device(),
        "versions": versions(),
    }
