"""GGUF export: a Hugging Face (or converted) model written with gguf-py, proven equal on llama.cpp.

- gguf-py gives the format, tensor names, special vocabularies and block quantizers but no HF converter; the
  conversion is written here for the families of ``edgeft.arch`` with a ``gguf_arch``; anything llama.cpp cannot
  run as the HF model does (an unsupported family, RoPE or attention option, or tokenizer) is refused in one line.
- Types (``QUANTS``): f32, f16, bf16, q8_0, q4_0 through gguf-py; q4_k_m, q5_k_m, q6_k through llama.cpp's
  quantizer (after an F32 file is validated). A converted (QAT) directory's int4/int8 grids are packed into
  Q4_0/Q8_0 blocks from their trained integers and scales, not quantized a second time.
- Before the file is renamed into place it is run on llama.cpp and compared with the model it came from; a
  failure raises ``EdgeftError`` in one line and leaves any previous file untouched.

One module per concern: ``quants`` (types and bounds), ``metadata`` (architecture keys, RoPE), ``vocab``
(tokenizer), ``tensors`` (names, layout, exact packing), ``validate`` (the llama.cpp self-check), ``write``
(:func:`export`). How and why: docs/exporters.md.
"""

from __future__ import annotations

from .metadata import llama3_rope_factors
from .quants import ACT_QUANT_ALLOWANCE, EXACT_BLOCK, EXACT_FLOAT_TYPE, EXACT_TYPES, QUANTS, QuantSpec
from .validate import (
    GREEDY_TOKENS,
    ROPE_CHECK_TOKENS,
    SPM_TOKENIZER_TEXTS,
    VALIDATION_CHAT,
    VALIDATION_TEXTS,
    check_tokenizer,
)
from .vocab import SPM_SPACE
from .write import export

__all__ = [
    "ACT_QUANT_ALLOWANCE",
    "EXACT_BLOCK",
    "EXACT_FLOAT_TYPE",
    "EXACT_TYPES",
    "GREEDY_TOKENS",
    "QUANTS",
    "ROPE_CHECK_TOKENS",
    "SPM_SPACE",
    "SPM_TOKENIZER_TEXTS",
    "VALIDATION_CHAT",
    "VALIDATION_TEXTS",
    "QuantSpec",
    "check_tokenizer",
    "export",
    "llama3_rope_factors",
]
