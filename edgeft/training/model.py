"""Build the model a run trains: load (optionally 4-/8-bit), adapt (LoRA via peft, or full), kernels, QAT.

``prepare_model(cfg, model_dir, tokenizer)`` is the single place that turns a config into a trainable module, so
that training, resuming (which must rebuild the model exactly before loading a checkpoint's tensors) and other
trainers (TRL's SFTTrainer, see tests) all get the same thing.

LoRA options are peft's: r, alpha, dropout, bias, rsLoRA (scaling alpha/sqrt(r)), target modules ("all-linear" by
default; ``lm_head`` and ``embed_tokens`` may be added, e.g. ``all-linear,lm_head,embed_tokens``), modules_to_save,
and continuing from a saved adapter (``adapter``: a PEFT directory or an edgeft run). QLoRA is bitsandbytes' NF4
4-bit base with double quantization (peft's ``prepare_model_for_kbit_training``); 8-bit loading likewise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeft.errors import EdgeftError
from edgeft.rundir import RunDir

log = logging.getLogger("edgeft")


def _quantization_config(cfg: Any, dtype: torch.dtype):
    if not (cfg.model.load_in_4bit or cfg.model.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise EdgeftError("--load-in-4bit/--load-in-8bit need bitsandbytes: pip install 'edgeft[bnb]'") from None
    if cfg.model.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def empty_model(model_dir: str | Path, dtype: torch.dtype) -> nn.Module:
    """The transformers model of ``model_dir`` with its parameters on the meta device (no weights read or
    allocated); buffers computed from the config on the CPU, as loading makes them. FSDP's ranks other than 0
    build this and get their shards of rank 0's weights (train/fsdp.py)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()  # from_pretrained's mode, so that both builds are the same module in the same state


def load_base(cfg: Any, model_dir: str | Path, device: str) -> nn.Module:
    """The transformers model in the run's dtype on ``device`` (bitsandbytes-quantized when asked); no remote code.
    ``device="meta"``: :func:`empty_model`, nothing loaded."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.hardware.dtype == "bf16" else torch.float32
    if device == "meta":
        return empty_model(model_dir, dtype)
    qcfg = _quantization_config(cfg, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if qcfg is not None:
        kwargs.update(quantization_config=qcfg, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (RuntimeError, ValueError, ImportError) as e:
        if qcfg is None:
            raise
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        bits = "4" if cfg.model.load_in_4bit else "8"
        raise EdgeftError(f"bitsandbytes {bits}-bit loading failed on {device}: {msg}") from None
    if qcfg is None:
        model.to(device)
    return model


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head: what peft's "all-linear" selects."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return sorted(names)


def target_modules(model: nn.Module, spec: str | list[str]) -> str | list[str]:
    """peft target modules from "all-linear", a list, or "all-linear" plus extras such as lm_head, embed_tokens."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["all-linear"]:
        return "all-linear"
    if "all-linear" in items:
        items = linear_module_names(model) + [s for s in items if s != "all-linear"]
    return sorted(set(items))


def _adapter_dir(path: str) -> Path:
    p = Path(path).expanduser()
    p = RunDir.adapter_of(p) or p  # an edgeft LoRA run: its trained adapter
    if not (p / "adapter_config.json").exists():
        raise EdgeftError(
            f"--adapter {path}: no adapter_config.json (expected a PEFT adapter directory or an edgeft LoRA run)"
        )
    return p


def apply_lora(cfg: Any, model: nn.Module) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.model.adapter:
        path = _adapter_dir(cfg.model.adapter)
        try:
            return PeftModel.from_pretrained(model, str(path), is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as e:
            raise EdgeftError(
                f"--adapter {path} does not fit {cfg.model.name}: {str(e).splitlines()[0][:200]}"
            ) from None
    lora = cfg.lora
    targets = target_modules(model, lora.target_modules)
    try:
        return get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=targets,
                bias=lora.bias,
                use_rslora=lora.use_rslora,
                modules_to_save=lora.modules_to_save or None,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as e:
        raise EdgeftError(f"LoRA: {str(e).splitlines()[0][:240]}") from None


def save_adapter(model: nn.Module, dest: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT ``save_pretrained`` of a LoRA model, also while QAT-prepared.

    QAT replaces each PEFT LoRA layer by a merged fake-quant module that keeps the original as ``_peft_module``
    (sharing its tensors); peft only recognises its own layer types, so they are swapped back for the save.
    ``state_dict``: the trainable tensors by parameter name, for a model whose own are sharded (FSDP).
    """
    swapped = []
    for name, mod in list(model.named_modules()):
        orig = getattr(mod, "_peft_module", None)
        if orig is not None and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, orig)
            swapped.append((parent, child, mod))
    try:
        if state_dict is None:
            model.save_pretrained(str(dest))
        else:
            model.save_pretrained(str(dest), state_dict=state_dict)
    finally:
        for parent, child, mod in reversed(swapped):
            setattr(parent, child, mod)


def apply_kernels(model: nn.Module, required: bool, checkpoint: str | None = None) -> list[str]:
    try:
        from edgeft.kernels import patch
    except ImportError as e:
        if required:
            raise EdgeftError(f"--kernels on: the fused kernels are unavailable ({e})") from None
        return []
    from edgeft.arch import kernel_specs

    return patch(model, kernel_specs(), checkpoint=checkpoint)


def activation_bytes(cfg: Any, model: nn.Module) -> int:
    """Estimated activations a training step keeps without checkpointing (the fused kernels' saved tensors).

    Per token and decoder layer: the norms' inputs and outputs and the residual (~6 hidden), q (twice with
    Qwen3's q/k norms), k, v and the attention output (~4 q + 3 kv widths), gate, up and the GLU output (3
    intermediate), in the training dtype, with a 25% margin for allocator slack and transients.
    """
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    heads = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or h // heads
    q, kv = heads * hd, (getattr(c, "num_key_value_heads", None) or heads) * hd
    per = 6 * h + 4 * q + 3 * kv + 3 * inter
    tokens = cfg.optim.batch_size * cfg.data.max_seq_length
    return int(1.25 * per * tokens * layers * (2 if cfg.hardware.dtype == "bf16" else 4))


def qat_weight_cache(cfg: Any, model: nn.Module, checkpointing: bool, sharded: bool, device: str = "cuda") -> str:
    """The QAT weight cache a run uses (``qat.prepare``'s ``cache``): "weights" keeps every fake-quantized weight
    for the optimizer step (fastest: no rebuild per use or in the backward), "codes" keeps integer codes and
    rebuilds per use (LoRA's merged weights: rebuilt, never kept).

    "weights" costs one quantized copy of the linears (trainable ones; a frozen head is quantized per use), so
    it is chosen only when that copy is at most 8% of the step's estimated memory (weights, gradients, AdamW
    state and the activations of an uncheckpointed step: within QAT's +10% memory budget with room for the
    loss's head copy). Measured on an H200 (bench/README.md): Qwen3-0.6B, batch 4 x 2048, copy 6% of the step:
    +7.6% peak, 0.94x full fine-tuning speed; Llama-3.2-1B, copy 13-18%: +12-20% peak, so "codes" there.
    Checkpointing (memory is short) and FSDP (a copy of every unsharded weight per process) take "codes"; CPU runs
    take "weights" (host memory is not what limits them, and rebuilding LoRA's merged weight without Triton is a
    rank-long loop of full-size ops).
    """
    if checkpointing or sharded:
        return "codes"
    if not device.startswith("cuda"):
        return "weights"
    lora = cfg.model.mode == "lora"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    copy = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is nn.Linear and w is not None and not (lora and m is head):
            copy += w.numel() * 2  # the copy is in the activation dtype: bf16 in the runs this matters for
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    step = params + 3 * trainable + activation_bytes(cfg, model)
    return "weights" if copy <= 0.08 * step else "codes"


def checkpoint_mode(cfg: Any, model: nn.Module, device: str, kernels: bool) -> str | None:
    """The gradient checkpointing a run uses: None, "plain" or "offload" (edgeft's, with the kernels) or "hf".

    "auto" checkpoints only when needed: skipping the recompute saves a third of a step's work, and a small model's
    activations fit an H200 many times over. Needed means the estimate of :func:`activation_bytes` plus the weights,
    gradients and optimizer state exceeds 70% of the GPU's free memory. Then "plain" (each layer's input stays on
    the GPU) if that fits, else "offload": moving checkpoints to host memory costs 10-40% of a step on an H200
    (bench/README.md), so it is the last resort.
    """
    mode = cfg.hardware.gradient_checkpointing
    if mode == "off":
        return None
    if mode == "auto":
        if not device.startswith("cuda"):
            return None  # CPU runs are small; memory is not what limits them
        from .precision import update_state_bytes

        params = sum(p.numel() * p.element_size() for p in model.parameters())
        low = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.element_size() == 2)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        # + gradients and AdamW's state, and bf16 weights' fp32 masters (training/precision.py; the pipeline always
        # updates through them)
        need = (
            params
            + update_state_bytes(low, cfg.hardware.dtype, "master")
            + 3 * (trainable - low)
            + activation_bytes(cfg, model)
        )
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if need <= 0.7 * free:
            return None
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        act = activation_bytes(cfg, model)
        elem = 2 if cfg.hardware.dtype == "bf16" else 4
        # plain keeps each layer's input hidden state, and one layer's activations during its recompute
        tokens = cfg.optim.batch_size * cfg.data.max_seq_length
        plain = need - act + tokens * c.hidden_size * c.num_hidden_layers * elem + act // c.num_hidden_layers
        mode = "plain" if plain <= 0.7 * free else "offload"
        log.info(
            "gradient checkpointing %s: about %.1f GiB needed without it, %.1f GiB free",
            mode,
            need / 2**30,
            free / 2**30,
        )
    if not kernels:
        return "hf"  # transformers' own (on the GPU); offloading needs edgeft's patched layers
    return mode


def prepare_model(
    cfg: Any, model_dir: str | Path, qat: bool = True, device: str | None = None, load_device: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The trainable model for a resolved config: returns (model, what was done, for edgeft.json).

    ``device`` is where training runs (it decides ``kernels: auto``); ``load_device`` where the weights are put,
    if elsewhere: under FSDP rank 0 loads on the CPU and the other ranks build the same module with ``"meta"``
    (no weights: LoRA, kernels and QAT only restructure modules), then sharding distributes rank 0's weights.
    """
    from edgeft import qat as qatlib

    device = device or cfg.hardware.device
    quantized = cfg.model.load_in_4bit or cfg.model.load_in_8bit
    plan = cfg.qat.plan() if qat else None
    model = load_base(cfg, model_dir, load_device or device)
    if cfg.model.mode == "lora":
        if quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = apply_lora(cfg, model)
        if (
            plan is not None
            and plan.embedding is not None
            and any("embed_tokens" in n and "lora_" in n for n, _ in model.named_parameters())
        ):
            raise EdgeftError(
                "LoRA on embed_tokens cannot be combined with a QAT plan that quantizes embeddings "
                "(the merged embedding is not fake-quantized); use modules_to_save or drop it"
            )
    else:
        model.requires_grad_(True)
    patched: list[str] = []
    use_kernels = cfg.hardware.kernels == "on" or (cfg.hardware.kernels == "auto" and device.startswith("cuda"))
    ckpt = checkpoint_mode(cfg, model, device, kernels=use_kernels)
    if use_kernels:
        patched = apply_kernels(model, required=cfg.hardware.kernels == "on", checkpoint=ckpt if ckpt != "hf" else None)
        if ckpt not in (None, "hf") and not any(r.startswith("checkpoint[") for r in patched):
            ckpt = "hf"  # an architecture the kernels do not patch keeps stock layers: checkpoint those
    if ckpt == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.mode == "lora" and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # frozen embeddings: the checkpointed input must carry a gradient
    if plan is not None:
        host = "cpu" if load_device == "meta" else load_device  # every FSDP rank picks what rank 0 picks
        sharded = host is not None and host != device
        qatlib.prepare(model, plan, cache=qat_weight_cache(cfg, model, ckpt is not None, sharded, device))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    info = {
        "kernels": patched,
        "gradient_checkpointing": ckpt,
        "qat": plan.to_dict() if plan else None,
        "trainable_parameters": n_train,
        "parameters": n_all,
        "quantized_base": "nf4" if cfg.model.load_in_4bit else ("int8" if cfg.model.load_in_8bit else None),
        "adapter_from": str(_adapter_dir(cfg.model.adapter))
        if (cfg.model.adapter and cfg.model.mode == "lora")
        else None,
    }
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{n_train:,}", f"{n_all:,}", 100 * n_train / max(1, n_all))
    return model, info
