"""The supported model families: one row per transformers ``model_type``, read by the kernels' patch, the ``.pte``
exporter and the GGUF exporter.

A row holds what differs between families as data: the RMSNorm class and its form, fused projections, q/k norms,
the MLP activation, where the attention reads its sliding window, and how llama.cpp takes the family (its GGUF
architecture, the q/k row order, the RoPE variants it carries, whether it applies the window). Adding a family
whose mechanisms are all known is one row; a new mechanism is new code in the stage that meets it, switched on by
a new field. Facts every family shares (RoPE from the model's own rotary module, ``head_dim`` from the config) are
read from the loaded model, not written here.

This module imports nothing heavy: ``Family.kernel_spec()`` builds the kernels' ``KernelSpec`` lazily, so the
kernels package stays free of edgeft imports (it takes the row from its caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One decoder family (a transformers ``model_type``) and how each stage maps it."""

    model_type: str  # config.model_type
    hf_class: str  # config.architectures[0] of its causal LM
    description: str
    # --- modules (kernels, .pte) --------------------------------------------------------------------------
    norm_class: str  # RMSNorm class name
    norm_eps_attr: str = "variance_epsilon"
    # HF's norm multiplies by (norm_offset + w) (Gemma: 1); llama.cpp multiplies by the stored weight
    norm_offset: float = 0.0
    qk_norm: bool = False  # RMSNorm on q and k per head, before RoPE
    fused_qkv: bool = False  # one qkv_proj: q, k, v rows in that order (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj: gate rows first (Phi-3)
    act_attr: str = "hidden_act"  # config attribute naming the MLP activation
    # where the attention reads its sliding window: None (never), "config" (config.sliding_window on every layer:
    # Mistral, Phi-3) or "layer" (the attention module's sliding_window, set per config.layer_types: Qwen2/3, Gemma3)
    window: str | None = None
    # --- GGUF (llama.cpp) -----------------------------------------------------------------------------------
    gguf_arch: str | None = None  # gguf.MODEL_ARCH member name; None: no GGUF export
    gguf_permute_qk: bool = False  # HF rotate-half q/k rows -> llama.cpp's interleaved (non-NEOX) RoPE
    # RoPE variants the file carries: "linear" (scaling keys), "llama3" (rope_freqs tensor, llama.cpp's LLAMA),
    # "longrope" (rope_factors_long/short tensors + attention factor, llama.cpp's PHI3)
    gguf_rope: tuple[str, ...] = ("default", "linear")
    # llama.cpp applies the family's sliding windows, written per layer (sliding_window + pattern + the local RoPE
    # base: Gemma3, _gemma3_metadata). False: llama.cpp attends to the whole context (its LLAMA graph has no window,
    # its PHI3 graph disables it), so a window smaller than the context caps the file's context length at it
    gguf_windows: bool = False
    gguf_activations: tuple[str, ...] = ("silu",)  # what llama.cpp's graph computes for the MLP
    # --- .pte (ExecuTorch) ------------------------------------------------------------------------------------
    pte: bool = True

    def kernel_spec(self) -> Any:
        """The kernels' ``KernelSpec`` for this family (``edgeft.kernels.patch``)."""
        from edgeft.kernels.patch import KernelSpec

        return KernelSpec(
            norm_class=self.norm_class,
            norm_eps_attr=self.norm_eps_attr,
            norm_offset=self.norm_offset,
            fused_qkv=self.fused_qkv,
            qk_norm=self.qk_norm,
            fused_gate_up=self.fused_gate_up,
            act_attr=self.act_attr,
            window=self.window,
        )


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family(
            "llama",
            "LlamaForCausalLM",
            "Llama 2/3.x, SmolLM2, TinyLlama",
            norm_class="LlamaRMSNorm",
            gguf_arch="LLAMA",
            gguf_permute_qk=True,
            gguf_rope=("default", "linear", "llama3"),
        ),
        # llama.cpp's converter maps MistralForCausalLM to its LLAMA architecture
        Family(
            "mistral",
            "MistralForCausalLM",
            "Mistral 7B, Mistral NeMo",
            norm_class="MistralRMSNorm",
            window="config",
            gguf_arch="LLAMA",
            gguf_permute_qk=True,
            gguf_rope=("default", "linear", "llama3"),
        ),
        Family(
            "qwen2", "Qwen2ForCausalLM", "Qwen2, Qwen2.5", norm_class="Qwen2RMSNorm", window="layer", gguf_arch="QWEN2"
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            "Qwen3 dense",
            norm_class="Qwen3RMSNorm",
            qk_norm=True,
            window="layer",
            gguf_arch="QWEN3",
        ),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "Gemma 3 text",
            norm_class="Gemma3RMSNorm",
            norm_eps_attr="eps",
            norm_offset=1.0,
            qk_norm=True,
            act_attr="hidden_activation",
            window="layer",
            gguf_arch="GEMMA3",
            gguf_windows=True,
            gguf_activations=("gelu_pytorch_tanh",),
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "Phi-3, Phi-3.5-mini, Phi-4-mini",
            norm_class="Phi3RMSNorm",
            fused_qkv=True,
            fused_gate_up=True,
            window="config",
            gguf_arch="PHI3",
            gguf_rope=("default", "longrope"),
        ),
    ]
}


def family(model_type: str | None) -> Family | None:
    """The row for a ``config.model_type`` (None: not a supported family)."""
    return FAMILIES.get(model_type) if model_type else None


def for_config(cfg: dict[str, Any]) -> Family | None:
    """The row for a config.json's contents: its ``model_type``, and its causal LM class when it names one."""
    fam = family(cfg.get("model_type"))
    names = cfg.get("architectures") or []
    if fam is not None and names and names[0] != fam.hf_class:
        return None  # e.g. a sequence classifier of a supported family
    return fam


def kernel_specs() -> dict[str, Any]:
    """Every family's ``KernelSpec`` by model_type: the table ``edgeft.kernels.patch`` takes."""
    return {mt: f.kernel_spec() for mt, f in FAMILIES.items()}


def rotary_dims(model: Any) -> int:
    """How many dims of each attention head the model's own rotary embedding rotates: ``head_dim``, or fewer under
    ``partial_rotary_factor`` (Phi-4-mini: 3/4). Read off its inverse-frequency table(s), which is what it uses."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    rotary = getattr(inner, "rotary_emb", None)
    freqs = [b for n, b in rotary.named_buffers() if n.endswith("inv_freq")] if rotary is not None else []
    dims = {2 * int(f.shape[-1]) for f in freqs} or {head_dim}  # Gemma3: one table per layer type, same width
    if len(dims) != 1 or not 0 < min(dims) <= head_dim:
        raise ValueError(f"rotary tables of widths {sorted(dims)} do not fit head_dim {head_dim}")
    return dims.pop()
