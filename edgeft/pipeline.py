"""The pipeline: stages as plain functions over the run directory (DESIGN.md).

```
runs/<name>/
  config.yaml        resolved config          model/       trained adapter or full weights (+ edgeft.json)
  metrics.jsonl      one line per step        converted/   what the phone runs (torchao tensors, or float)
  loss.png                                    exports/     model.pte, model-<quant>.gguf, torchao/
  baseline/          the no-QAT twin (same seed and data): model/, converted/ (= PTQ), metrics.jsonl
  eval/              report.md, report.json, metrics.png
```

Each stage reads what the previous one wrote, so ``export`` and ``evaluate`` can run alone on an old run.
The CLI and the Python API both call these functions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import TrainConfig, dump_yaml, load_yaml, resolve
from .errors import EdgeftError
from .fsutil import atomic_dir, write_json, write_text

log = logging.getLogger("edgeft")

RUNS_DIR = Path("runs")
EXPORT_FORMATS = ("pte", "gguf", "torchao")


# --- run directories ---------------------------------------------------------------------------------


def find_run(run: str | Path | None) -> Path:
    """The given run directory, or the newest one under ./runs; one clear error if there is none."""
    if run is None:
        candidates = [p for p in RUNS_DIR.glob("*") if (p / "config.yaml").exists()] if RUNS_DIR.is_dir() else []
        if not candidates:
            raise EdgeftError(f"no run found under ./{RUNS_DIR}; pass --run DIR or train first")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    path = Path(run)
    if not (path / "config.yaml").exists():
        raise EdgeftError(f"{path} is not an edgeft run directory (no config.yaml)")
    return path


def run_config(run: Path) -> TrainConfig:
    return load_yaml(run / "config.yaml")


# --- train (load -> adapt -> qat.prepare -> train -> qat.convert) ------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train per ``cfg`` and write the run directory; returns its path.

    With a QAT scheme and ``cfg.ptq`` (the default), the same config is also trained without fake
    quantization into ``baseline/``: its float weights are the BF16 reference and its quantized form the
    PTQ baseline that QAT is measured against.
    """
    import torch

    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from .data import encode_dataset, load_conversations
    from .models import resolve_model

    conversations = load_conversations(cfg.data, "train")  # bad data fails before any model work
    model_dir = resolve_model(cfg.model)
    run = Path(cfg.out) if cfg.out else RUNS_DIR / f"{Path(cfg.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    write_text(run / "config.yaml", dump_yaml(cfg))
    log.info("run directory: %s", run)

    _train_variant(cfg, run, model_dir, conversations, qat_during_training=cfg.qat is not None)
    if cfg.qat and cfg.ptq:
        (run / "baseline").mkdir(exist_ok=True)
        (run / "baseline" / "metrics.jsonl").unlink(missing_ok=True)
        _train_variant(cfg, run / "baseline", model_dir, conversations, qat_during_training=False)

    from .train import plot_loss, read_metrics

    curves = {("QAT " + cfg.qat if cfg.qat else "train"): read_metrics(run / "metrics.jsonl")}
    if (run / "baseline" / "metrics.jsonl").exists():
        curves["no QAT (baseline)"] = read_metrics(run / "baseline" / "metrics.jsonl")
    plot_loss(curves, run / "loss.png", title=f"{cfg.model} on {cfg.data}")
    return run


def _train_variant(cfg: TrainConfig, root: Path, model_dir: Path, conversations, qat_during_training: bool) -> None:
    import torch

    from . import qat as qatlib
    from .data import encode_dataset
    from .models import load_model
    from .train import train_loop

    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    model, tokenizer = load_model(model_dir, dtype=dtype, device=cfg.device)
    examples = encode_dataset(tokenizer, conversations, cfg.max_seq_length)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    else:
        model.requires_grad_(True)
    patched: list[str] = []
    if cfg.kernels == "on" or (cfg.kernels == "auto" and cfg.device.startswith("cuda")):
        patched = _apply_kernels(model, required=cfg.kernels == "on")
    plan = qatlib.resolve(cfg.qat, cfg.qat_group_size) if cfg.qat else None
    if plan is not None and qat_during_training:
        qatlib.prepare(model, plan)
    label = f"{'QAT ' + cfg.qat if qat_during_training else 'train'} ({cfg.mode})"
    summary = train_loop(
        model,
        examples,
        pad_id=tokenizer.pad_token_id,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        device=cfg.device,
        metrics_path=root / "metrics.jsonl",
        progress=cfg.progress,
        desc=label,
    )
    if qatlib.is_prepared(model):
        qatlib.unprepare(model)
    if patched:
        from edgeft.kernels import unpatch

        unpatch(model)
    model = model.to("cpu").float()
    info = {
        "base_model": str(model_dir),
        "mode": cfg.mode,
        "qat": plan.to_dict() if (plan and qat_during_training) else None,
        "kernels": patched,
        "train": summary,
        "examples": len(examples),
    }
    with atomic_dir(root / "model") as tmp:
        model.save_pretrained(tmp)  # PEFT: adapter only; full: the whole model
        tokenizer.save_pretrained(tmp)
        (tmp / "edgeft.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("%s: loss %.4f -> %.4f in %.0fs", label, summary["first_loss"], summary["final_loss"], summary["seconds"])
    convert_model(model, tokenizer, plan, root / "converted")


def _apply_kernels(model, required: bool) -> list[str]:
    try:
        from edgeft.kernels import patch
    except ImportError as e:
        if required:
            raise EdgeftError(f"--kernels on: the fused kernels are unavailable ({e})") from None
        return []
    return patch(model)


def convert_model(model, tokenizer, plan, out_dir: Path) -> Path:
    """qat.convert: merge LoRA, quantize per ``plan`` (None: keep float), write ``out_dir`` atomically."""
    from . import qat as qatlib

    if plan is None:
        merged = qatlib.merge_lora(model)
        record: dict[str, Any] = {"plan": None, "linears": [], "skipped": [], "embeddings": []}
        return qatlib.save_converted(merged, tokenizer, record, out_dir)
    converted, record = qatlib.convert(model, plan)
    return qatlib.save_converted(converted, tokenizer, record, out_dir)


def load_trained(root: Path):
    """The trained model of ``root`` (a run or its baseline) as a plain float transformers model + tokenizer."""
    from .models import load_model

    info = json.loads((root / "model" / "edgeft.json").read_text())
    if info["mode"] == "lora":
        from peft import PeftModel

        base, tokenizer = load_model(info["base_model"])
        model = PeftModel.from_pretrained(base, str(root / "model")).merge_and_unload()
        return model, tokenizer
    return load_model(root / "model")


def float_dir(root: Path) -> Path:
    """An HF directory of the trained float model of ``root`` (merging LoRA into ``merged/`` once)."""
    if not (root / "model" / "edgeft.json").exists():
        raise EdgeftError(f"{root} has no trained model (model/edgeft.json)")
    info = json.loads((root / "model" / "edgeft.json").read_text())
    if info["mode"] == "full":
        return root / "model"
    dest = root / "merged"
    if not (dest / "config.json").exists():
        model, tokenizer = load_trained(root)
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return dest


def convert(run: str | Path | None = None) -> Path:
    """Re-run qat.convert for an existing run from its saved model/ (e.g. after changing convert code)."""
    from . import qat as qatlib

    run = find_run(run)
    for root in [run, run / "baseline"]:
        if not (root / "model" / "edgeft.json").exists():
            continue
        cfg = run_config(run)
        plan = qatlib.resolve(cfg.qat, cfg.qat_group_size) if cfg.qat else None
        model, tokenizer = load_trained(root)
        convert_model(model, tokenizer, plan, root / "converted")
    return run


# --- export --------------------------------------------------------------------------------------------


def export(fmt: str, run: str | Path | None = None, quant: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Export the run's converted model as ``pte``, ``gguf`` (``quant``) or ``torchao``; returns the report."""
    if fmt not in EXPORT_FORMATS:
        raise EdgeftError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    run = find_run(run)
    src = run / "converted"
    if not (src / "scheme.json").exists():
        raise EdgeftError(f"{run} has no converted model; run `edgeft train` to completion first")
    report = export_dir(fmt, src, run / "exports", quant=quant, **kwargs)
    _record_export(run / "exports", fmt, report)
    return report


def default_gguf_quant(src: Path) -> str:
    """The GGUF type at the scheme's bit width: q4_0 for int4 schemes, q8_0 for int8, f16 for float."""
    scheme = src / "scheme.json"
    plan = json.loads(scheme.read_text()).get("plan") if scheme.exists() else None
    if not plan:
        return "f16"
    from . import qat as qatlib

    return "q4_0" if qatlib.SCHEMES[plan["scheme"]].weight_dtype == "int4" else "q8_0"


def export_dir(fmt: str, src: Path, out_dir: Path, quant: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Export one model directory (converted or float HF) into ``out_dir``."""
    if fmt == "pte":
        from edgeft.exporters import pte

        return pte.export(src, out_dir, **kwargs)
    if fmt == "gguf":
        from edgeft.exporters import gguf

        quant = (quant or default_gguf_quant(src)).lower()
        return gguf.export(src, out_dir / f"model-{quant}.gguf", quant=quant, **kwargs)
    from edgeft.exporters import torchao as torchao_exporter

    return torchao_exporter.export(src, out_dir / "torchao", **kwargs)


def _record_export(out_dir: Path, fmt: str, report: dict[str, Any]) -> None:
    manifest = out_dir / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    data[report.get("name", fmt) if isinstance(report, dict) else fmt] = report
    write_json(manifest, data)


# --- evaluate -------------------------------------------------------------------------------------------


def evaluate(run: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """BF16 vs PTQ vs QAT on the chosen runtimes; writes ``eval/report.{md,json}`` and plots."""
    from edgeft.devices.evaluate import evaluate_run

    return evaluate_run(find_run(run), **kwargs)


def train_from_yaml(path: str | Path, **overrides: Any) -> Path:
    """Train from a YAML config file with keyword overrides."""
    cfg = load_yaml(path)
    return train(replace(cfg, **overrides))
