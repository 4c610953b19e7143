"""Exporters: ExecuTorch .pte, GGUF, TorchAO; each validates its artifact on the host runtime.

:func:`export_dir` writes one model directory's artifact into an exports directory under the run directory's names
(``edgeft.rundir``); the exporter modules are imported only when used, so this package imports without their
backends (executorch, gguf, llama-cpp-python, torchao).
"""

from __future__ import annotations

import json
import os
from typing import Any

from edgeft.rundir import Exports, scheme_path

FORMATS = ("pte", "gguf", "torchao")


def default_gguf_quant(src: str | os.PathLike) -> str:
    """The GGUF type at the scheme's bit width: q4_0 for int4 schemes, q8_0 for int8, f16 for float."""
    scheme = scheme_path(src)
    plan = json.loads(scheme.read_text()).get("plan") if scheme.exists() else None
    if not plan:
        return "f16"
    from edgeft.qat import SCHEMES

    return "q4_0" if SCHEMES[plan["scheme"]].weight_dtype == "int4" else "q8_0"


def export_dir(
    fmt: str, src: str | os.PathLike, out_dir: str | os.PathLike, quant: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Export one model directory (converted or float HF) into the exports directory ``out_dir``."""
    out = Exports(out_dir)
    if fmt == "pte":
        from . import pte

        return pte.export(src, out.path, **kwargs)
    if fmt == "gguf":
        from . import gguf

        quant = (quant or default_gguf_quant(src)).lower()
        return gguf.export(src, out.gguf(quant), quant=quant, **kwargs)
    from . import torchao as torchao_exporter

    return torchao_exporter.export(src, out.torchao, **kwargs)
