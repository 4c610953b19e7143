"""edgeft: fine-tune a Hugging Face causal LM with QAT and take it to a phone.

The public API mirrors the CLI verbs; every name is imported lazily so that ``import edgeft`` stays cheap
and works without the optional backends (executorch, llama-cpp-python, gguf, torchao).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": ("edgeft.config", "TrainConfig"),
    "LoraSettings": ("edgeft.config", "LoraSettings"),
    "EdgeftError": ("edgeft.errors", "EdgeftError"),
    "train": ("edgeft.pipeline", "train"),
    "export": ("edgeft.pipeline", "export"),
    "evaluate": ("edgeft.pipeline", "evaluate"),
    "convert": ("edgeft.pipeline", "convert"),
    "run_artifact": ("edgeft.devices.host_run", "run_artifact"),
    "resolve_model": ("edgeft.models", "resolve_model"),
    "load_model": ("edgeft.models", "load_model"),
    "qat": ("edgeft.qat", None),
    "kernels": ("edgeft.kernels", None),
    "exporters": ("edgeft.exporters", None),
    "devices": ("edgeft.devices", None),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgeft' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    mod = import_module(module)
    return mod if attr is None else getattr(mod, attr)
