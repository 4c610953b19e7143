"""The GGUF output types and what a correct export of each must meet.

``QUANTS`` maps each type edgeft writes (f32 ... q6_k) to its GGUF file type, the GGML types of its weights and
output, and the bounds validation holds it to: against a float model holding the file's own weights (fidelity)
and against the source model. ``EXACT_TYPES`` says which block types hold a trained (QAT) grid exactly. The
numbers and what they were measured on: docs/exporters.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantSpec:
    """A GGUF output type and the validation tolerances a correct export of it meets."""

    name: str
    file_type: str  # gguf.LlamaFileType member name
    weight: str  # gguf.GGMLQuantizationType for 2-D weights
    output: str  # type of the output projection (or the tied embedding)
    fidelity_rel_err: float  # llama.cpp vs the file's own weights in eager PyTorch
    fidelity_top1: float
    rel_err: float  # llama.cpp vs the source model (adds the type's rounding error)
    top1: float
    greedy_exact: bool
    llama_ftype: str | None = None  # llama_cpp LLAMA_FTYPE_* constant: written by llama_model_quantize


QUANTS: dict[str, QuantSpec] = {
    q.name: q
    for q in [
        QuantSpec("f32", "ALL_F32", "F32", "F32", 0.001, 0.99, 0.002, 0.99, greedy_exact=True),
        QuantSpec("f16", "MOSTLY_F16", "F16", "F16", 0.005, 0.98, 0.01, 0.97, greedy_exact=True),
        QuantSpec("bf16", "MOSTLY_BF16", "BF16", "BF16", 0.02, 0.95, 0.04, 0.93, greedy_exact=False),
        QuantSpec("q8_0", "MOSTLY_Q8_0", "Q8_0", "Q8_0", 0.10, 0.85, 0.20, 0.80, greedy_exact=False),
        QuantSpec("q4_0", "MOSTLY_Q4_0", "Q4_0", "Q8_0", 0.15, 0.75, 0.80, 0.30, greedy_exact=False),
        # K-quants: llama.cpp picks each tensor's type (Q4_K_M mixes Q4_K/Q6_K; rows not a multiple of 256
        # fall back to Q5_0/Q5_1/Q8_0), so ``weight``/``output`` only describe the main type
        QuantSpec(
            "q4_k_m",
            "MOSTLY_Q4_K_M",
            "Q4_K",
            "Q6_K",
            0.15,
            0.75,
            0.50,
            0.45,
            greedy_exact=False,
            llama_ftype="LLAMA_FTYPE_MOSTLY_Q4_K_M",
        ),
        QuantSpec(
            "q5_k_m",
            "MOSTLY_Q5_K_M",
            "Q5_K",
            "Q6_K",
            0.15,
            0.75,
            0.45,
            0.55,
            greedy_exact=False,
            llama_ftype="LLAMA_FTYPE_MOSTLY_Q5_K_M",
        ),
        QuantSpec(
            "q6_k",
            "MOSTLY_Q6_K",
            "Q6_K",
            "Q6_K",
            0.12,
            0.80,
            0.25,
            0.70,
            greedy_exact=False,
            llama_ftype="LLAMA_FTYPE_MOSTLY_Q6_K",
        ),
    ]
}

# GGUF block types that can hold a trained symmetric grid exactly: nibble/int8 = q (+ 8), d = scale as fp16.
# A requested type maps each trained weight dtype to the block written (the smallest exact one it allows).
EXACT_TYPES: dict[str, dict[str, str]] = {
    "q4_0": {"int4": "Q4_0", "int8": "Q8_0"},  # an int8 grid (embeddings) stays Q8_0 rather than re-rounded
    "q8_0": {"int4": "Q8_0", "int8": "Q8_0"},
}
EXACT_BLOCK = 32
# In an exact export, the 2-D tensors the scheme left in float (e.g. the token embedding of int4/int8-int4) are
# written Q8_0 whatever the requested type: Q4_0 there would be a second quantization QAT never saw (tiny models:
# logits rel. error vs the converted model 0.11-0.14 with a Q4_0 embedding, 0.013-0.015 with Q8_0, 0.013 with F16).
EXACT_FLOAT_TYPE = "Q8_0"

# torchao's int8 per-token activations vs llama.cpp's (float / Q8_0 blocks): extra room on the source bounds
ACT_QUANT_ALLOWANCE = {"rel_err": 0.05, "top1": 0.10}
