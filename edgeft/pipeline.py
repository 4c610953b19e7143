"""The pipeline: stages as plain functions over the run directory (DESIGN.md), whose layout
:class:`edgeft.rundir.RunDir` owns (model/, converted/, exports/, baseline/ the no-QAT twin, ...). ``train`` runs
the training plan that :func:`edgeft.recipes.choose` picks.

Each stage reads what the previous one wrote, so ``export`` and ``evaluate`` can run alone on an old run.
The CLI and the Python API both call these functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import recipes
from .config import TrainConfig, config_diff, dump_yaml, fit_budget, identity, identity_defaults, load_yaml, resolve
from .errors import EdgeftError
from .exporters import export_dir
from .fsutil import atomic_dir, write_json, write_text
from .models import load_trained
from .qat.schemes import AUTO
from .rundir import RUNS_DIR, RunDir, Variant, find_run

log = logging.getLogger("edgeft")

EXPORT_FORMATS = ("pte", "gguf", "torchao")


# --- run directories ---------------------------------------------------------------------------------


def run_config(run: str | Path) -> TrainConfig:
    """The config a run was trained with (its ``config.yaml``)."""
    return load_yaml(RunDir(run).config_file)


# --- train (load -> adapt -> qat.prepare -> train -> qat.convert) ------------------------------------


def train(cfg: TrainConfig, dataset: Any = None) -> Path:
    """Train per ``cfg`` and write the run directory; returns its path.

    ``dataset``: an in-memory ``datasets.Dataset`` (or list of row dicts) used instead of ``cfg.data.path``.
    With a QAT scheme and ``cfg.qat.ptq`` (the default), the same config is also trained without fake
    quantization into ``baseline/``: its float weights are the BF16 reference and its quantized form the
    PTQ baseline that QAT is measured against. ``cfg.run.resume`` continues an interrupted run from its newest
    checkpoints (each variant separately); under ``torchrun`` every process trains a data-parallel replica.
    """
    import torch

    from .training.distributed import init_from_env, shutdown

    cfg = resolve(cfg)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    dist, device = init_from_env(cfg.hardware.device)
    try:
        return _train(cfg, dataset, dist, device)
    finally:
        shutdown(dist)


def _check_run_dir(run: RunDir, cfg: TrainConfig) -> None:
    """Refuse to clobber a run by accident, or to resume something that is not there (nothing written yet)."""
    if cfg.run.resume and cfg.run.overwrite:
        raise EdgeftError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    root = run.root
    if root.exists() and not root.is_dir():
        raise EdgeftError(f"--out {root} is a file, not a directory")
    exists = run.is_run()
    if not exists and root.is_dir() and any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise EdgeftError(
            f"--out {root} is a directory that holds files but no edgeft run; choose an empty or new directory"
        )
    if cfg.run.resume and not exists:
        raise EdgeftError(f"--resume: {root} holds no run to resume (no {run.config_file.name})")
    if exists and not cfg.run.resume and not cfg.run.overwrite and any(v.has_progress() for v in run.variants()):
        raise EdgeftError(f"{root} already holds a run; pass --resume to continue it or --overwrite to replace it")


def _remove_stale_siblings(run: Path) -> None:
    """Remove the temporary runs that a killed ``--overwrite`` of ``run`` left beside it (their process is gone)."""
    from .fsutil import remove_stale

    if run.parent.is_dir():
        remove_stale(run.parent, f".{run.name}.")


def _load_records(cfg: TrainConfig, dataset: Any) -> list:
    from .data import load_records

    return load_records(
        dataset if dataset is not None else cfg.data.path,
        cfg.data.split,
        prompt_template=cfg.data.prompt_template,
        output_column=cfg.data.output_column,
        conversation_extension=cfg.data.conversation_extension,
        system_prompt=cfg.data.system_prompt,
        seed=cfg.optim.seed,
    )


def _prepare_data(cfg: TrainConfig, records: list, model_dir: Path, dataset: Any = None):
    """Tokenizer with the chosen chat template, and the encoded train/eval examples (all errors before writing).

    Only conversations need a chat template: raw text trains on any tokenizer (a base model's included), and a run
    of raw text on a tokenizer without one keeps none (``template["name"]`` None)."""
    from transformers import AutoTokenizer

    from .data import apply_template, conversation_rows, encode_dataset, split_train_eval

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    needed_by = "the data holds conversations" if any(not isinstance(r, str) for r in records) else None
    if needed_by and cfg.data.chat_template is None and not getattr(tokenizer, "chat_template", None):
        needed_by = conversation_rows(
            records, dataset if dataset is not None else cfg.data.path, cfg.data.split, cfg.data.prompt_template
        )
    template = apply_template(tokenizer, cfg.data.chat_template, cfg.model.name, needed_by=needed_by)
    name = f"{cfg.data.chat_template!r}" if cfg.data.chat_template else f"{cfg.model.name}'s own"
    train_records, eval_records = split_train_eval(records, cfg.eval.split, cfg.optim.seed)
    train_ex = encode_dataset(tokenizer, train_records, cfg.data.max_seq_length, template_name=name)
    eval_ex = (
        encode_dataset(tokenizer, eval_records, cfg.data.max_seq_length, template_name=name) if eval_records else []
    )
    return tokenizer, template, train_ex, eval_ex


def _finalize_steps(cfg: TrainConfig, train_ex: list, world: int) -> TrainConfig:
    """max_steps from epochs, and the default evaluation interval, once the data size is known."""
    import math

    from .data import Batcher

    cfg = cfg.replace()
    if cfg.optim.epochs is not None:
        units = len(Batcher(train_ex, cfg.data.batching, 0, cfg.data.max_seq_length, cfg.optim.seed))
        per_epoch = units // (cfg.optim.batch_size * world) if world > 1 else math.ceil(units / cfg.optim.batch_size)
        cfg.optim.max_steps = max(1, math.ceil(cfg.optim.epochs * per_epoch / cfg.optim.grad_accum))
    # after epochs: the QAT run trains --qat-max-steps, else the ratio (flag or preset) of the twin's, else as long
    cfg.qat = cfg.qat.resolve_steps(cfg.optim.max_steps)
    if cfg.eval.split > 0 and cfg.eval.steps is None:
        cfg.eval.steps = max(1, math.ceil(cfg.optim.max_steps / 10))
    return cfg


def _recipe_line(cfg: TrainConfig) -> str | None:
    """One line naming the recipe values the QAT preset chose (and those of its recipe a flag overrode); None when
    the preset chose nothing."""
    q = cfg.qat
    preset, recipe = q.preset_recipe()
    chosen = q.preset_choices()
    if not recipe or not (chosen or any(q.sources.get(k) == "flag" for k in recipe)):
        return None
    parts = [f"{k} {getattr(q, k)!s}" for k in q.RECIPE if k in chosen and k != "max_steps"]
    if "max_steps" in chosen:
        floor = f", at least {q.min_steps}" if q.min_steps else ""
        parts.append(f"max_steps {q.max_steps} ({q.steps_ratio:g} x {cfg.optim.max_steps}{floor})")
    given = [k for k in recipe if q.sources.get(k) == "flag"]
    if "steps_ratio" in recipe and "steps_ratio" not in q.sources:  # --qat-max-steps set the steps instead
        given.append("max_steps")
    line = f"QAT recipe of preset {preset}: {', '.join(parts) if parts else 'nothing'}"
    return line + (f"; given instead: {', '.join(given)}" if given else "")


def _describe_dataset(dataset: Any) -> str:
    n = len(dataset) if hasattr(dataset, "__len__") else "?"
    fp = getattr(dataset, "_fingerprint", None)
    return f"<{type(dataset).__name__}: {n} rows{', fingerprint ' + fp if fp else ''}>"


def _train(cfg: TrainConfig, dataset: Any, dist, device: str) -> Path:
    from .models import resolve_model
    from .training.distributed import barrier, broadcast_object

    is_main = dist is None or dist.is_main
    world = dist.world if dist else 1
    if dataset is not None:
        cfg = cfg.replace(data=_describe_dataset(dataset))
    run = (
        Path(cfg.run.out) if cfg.run.out else RUNS_DIR / f"{Path(cfg.model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run = RunDir(broadcast_object(str(run), dist))
    if is_main:
        _remove_stale_siblings(run.root)  # a killed --overwrite's hidden directory: its process is gone
    _check_run_dir(run, cfg)
    records = _load_records(cfg, dataset)  # bad data fails before any model work
    model_dir = resolve_model(cfg.model.name)
    tokenizer, template, train_ex, eval_ex = _prepare_data(cfg, records, model_dir, dataset)
    cfg = _finalize_steps(cfg, train_ex, world)
    if cfg.qat.scheme == AUTO and not (cfg.run.resume and run.qat_plan.exists()):
        import torch

        from .qat import plan as fit
        from .training.model import empty_model

        # an impossible budget fails here, before anything is trained or written
        fit.check_feasible(
            fit.model_shape(empty_model(model_dir, torch.float32), model_dir),
            fit_budget(cfg),
            (cfg.qat.group_size,) if cfg.qat.group_size else None,
        )
    if cfg.run.resume:
        saved = resolve(load_yaml(run.config_file))
        diff = config_diff(saved, cfg)
        if diff:
            raise EdgeftError(
                f"--resume: {run.root} was trained with a different config ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); resume with the same settings"
            )
    data_print = _data_fingerprint(records)
    if cfg.run.resume:
        _check_data(run, data_print)
        _check_checkpoints(run)
    # a new run into an empty --out trains in place (a kill leaves it resumable); one replacing an existing run
    # (--overwrite) trains into a hidden sibling swapped in at the end, so the old run survives any failure
    work = run
    if is_main:
        if cfg.run.resume:  # what a killed writer left half-written inside the run
            from .fsutil import remove_stale

            for v in run.variants():
                remove_stale(v.root)
        replacing = not cfg.run.resume and run.root.exists() and any(run.root.iterdir())
        if replacing:
            work = RunDir(_temp_sibling(run.root))
    created = is_main and not run.root.exists()
    work = RunDir(broadcast_object(str(work.root), dist))
    try:
        _train_into(
            cfg, run, work, dist, is_main, model_dir, (tokenizer, template, train_ex, eval_ex), data_print, device
        )
    except BaseException:
        if is_main and work != run:
            shutil.rmtree(work.root, ignore_errors=True)
        elif created and not any(v.has_progress() for v in run.variants()):  # nothing to resume: leave nothing behind
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    if is_main and work != run:
        _swap_in(work.root, run.root)
    barrier(dist)
    return run.root


def _temp_sibling(run: Path) -> Path:
    """A fresh hidden directory beside ``run``, named after this process (fsutil.remove_stale knows the form)."""
    import tempfile

    run.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{run.name}.tmp-{os.getpid()}-", dir=run.parent))


def _swap_in(work: Path, run: Path) -> None:
    """Replace ``run`` by the complete ``work``: two renames, the old run removed only after the second."""
    for v in RunDir(work).variants():
        info = v.model_info
        if info.exists():  # paths recorded while training name the run's final place
            write_text(info, info.read_text().replace(json.dumps(str(work))[1:-1], json.dumps(str(run))[1:-1]))
    old = run.with_name(f".{run.name}.old-{os.getpid()}")
    os.replace(run, old)
    os.replace(work, run)
    shutil.rmtree(old, ignore_errors=True)


def _data_fingerprint(records: list) -> dict[str, Any]:
    """What the run trains on, as a hash of the loaded examples (any source: a file, builtin, in-memory)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()
    return {"sha256": digest, "records": len(records)}


def _check_checkpoints(run: RunDir) -> None:
    """The newest checkpoint of each unfinished variant readable, before any model work (a damaged file is one
    error naming it and the checkpoint before it)."""
    from .training import CheckpointManager

    for v in run.variants():
        if not v.done():
            CheckpointManager(v.checkpoints).verify_latest()


def _check_data(run: RunDir, data_print: dict[str, Any]) -> None:
    saved = run.data_file
    if not saved.exists():  # a run from before the fingerprint was recorded
        return
    try:
        before = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EdgeftError(f"--resume: {saved} is damaged (not JSON); it records the data the run trained on") from None
    if before.get("sha256") != data_print["sha256"]:
        raise EdgeftError(
            f"--resume: the data differs from what {run.root} was trained on ({before.get('records')} "
            f"examples then, {data_print['records']} now, contents changed); resume with the same data "
            "or train a new run"
        )


def _train_into(
    cfg: TrainConfig,
    run: RunDir,
    work: RunDir,
    dist,
    is_main: bool,
    model_dir: Path,
    data: tuple,
    data_print: dict[str, Any],
    device: str,
) -> None:
    """Write the run into ``work`` (``run`` itself, or the sibling that replaces it)."""
    from .data import padding_efficiency
    from .training.distributed import barrier

    tokenizer, template, train_ex, eval_ex = data
    notes: list[tuple] = []  # info lines, shown once the model has loaded: an early error stays the only line
    if is_main:
        work.root.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(cfg.replace(resume=False, overwrite=False))
        if cfg.run.resume:  # the run keeps its own record of where it is; unchanged files are not rewritten
            text = dump_yaml(cfg.replace(resume=False, overwrite=False, out=run_config(run.root).run.out))
        if not work.config_file.exists() or work.config_file.read_text() != text:
            write_text(work.config_file, text)
        if not work.data_file.exists():
            write_json(work.data_file, data_print)
        notes.append(("run directory: %s", run.root))
        recipe_line = _recipe_line(cfg)
        if recipe_line:
            notes.append(("%s", recipe_line))
        lengths = [len(ex["input_ids"]) for ex in train_ex]
        notes.append(
            (
                "data: %d training examples (%d tokens), %d eval; chat template: %s",
                len(train_ex),
                sum(lengths),
                len(eval_ex),
                template["name"] or "none (raw text)",
            )
        )
        if cfg.data.batching == "padding_free":
            notes.append(
                (
                    "padding-free batching: no pad tokens (a padded batch of %d would be %.1f%% padding)",
                    cfg.optim.batch_size,
                    100 * (1 - padding_efficiency(lengths, cfg.optim.batch_size)),
                )
            )
    barrier(dist)
    run = work

    planned = [cfg]  # --qat auto: the config of the plan chosen before the first QAT run (and for the PTQ after)

    def train_run(root: Variant, variant_data: tuple, qat: bool, twin: Variant | None = None) -> None:
        if qat and cfg.qat.scheme == AUTO and len(planned) == 1:
            # calibrate the model QAT starts from (the twin, else the pretrained one) on the user's data, then plan
            planned.append(_fit_plan(cfg, run, model_dir, data, device, twin, dist))
        _train_variant(
            planned[-1],
            root,
            model_dir,
            variant_data,
            qat_during_training=qat,
            dist=dist,
            device=device,
            twin=twin,
            notes=notes,
        )

    # the plan: one fine-tune, or the float twin then QAT from it (edgeft/recipes/)
    recipes.choose(cfg).run(cfg, run, data, train_run, is_main)

    if is_main:
        from .training import plot_loss, read_metrics

        curves = {("QAT " + cfg.qat.scheme if cfg.qat.scheme else "train"): read_metrics(run.metrics)}
        if run.baseline.metrics.exists():
            curves["no QAT (baseline)"] = read_metrics(run.baseline.metrics)
        plot_loss(curves, run.loss_plot, title=f"{cfg.model.name} on {cfg.data.path}")
    barrier(dist)


def apply_fit_plan(cfg: TrainConfig, plan: Any) -> TrainConfig:
    """The config that trains a device-fit plan: ``--qat auto`` with the plan's group size, int8 linears and
    embedding treatment (in memory; config.yaml keeps the request, qat_plan.json the plan)."""
    new = cfg.replace(qat_group_size=plan.group_size, qat_int8=list(plan.int8_modules))
    new.qat = dataclasses.replace(new.qat, fit_embedding=plan.qat_plan().embedding)
    return new


def _fit_plan(
    cfg: TrainConfig, run: RunDir, model_dir: Path, data, device: str, twin: Variant | None, dist
) -> TrainConfig:
    """``--qat auto``: calibrate, choose and write ``qat_plan.json`` (a resumed run keeps the plan it chose)."""
    from .models import float_dir
    from .qat import plan as fit
    from .training.distributed import broadcast_object
    from .training.model import load_base

    plan = fit.load(run.root) if cfg.run.resume else None
    if plan is None and (dist is None or dist.is_main):
        tokenizer, _, train_ex, _ = data
        src = float_dir(twin.root) if twin is not None else model_dir
        # fp32: a linear's loss rise is a small difference of two losses, which bf16 rounding would blur
        model = load_base(cfg.replace(load_in_4bit=False, load_in_8bit=False, dtype="fp32"), src, device)
        batches = fit.calibration_batches(train_ex, tokenizer.pad_token_id, device=device)
        plan = fit.plan_for_model(model, batches, fit_budget(cfg), src, cfg.qat.weight_scale, cfg.qat.group_size)
        plan.calibration["model"] = str(src)
        del model
        plan.write(run.root)
        for line in plan.summary()[:5]:
            log.info("%s", line)
    if dist is not None:
        plan = fit.FitPlan.from_dict(broadcast_object(plan.to_dict() if plan is not None else None, dist))
    if twin is not None and (dist is None or dist.is_main):
        # the twin was converted before the plan existed: its PTQ must quantize as the plan does
        record = (twin.scheme_record() or {}).get("plan") or {}
        if record != json.loads(json.dumps(plan.qat_plan().to_dict())):
            model, tokenizer = load_trained(twin.root)
            convert_model(model, tokenizer, plan.qat_plan(), twin.converted)
    return apply_fit_plan(cfg, plan)


def run_qat_plan(run: RunDir, cfg: TrainConfig) -> Any:
    """The QAT plan a run trained: the config's, or for ``--qat auto`` its ``qat_plan.json``."""
    if cfg.qat.scheme == AUTO:
        from .qat import plan as fit

        plan = fit.load(run.root)
        if plan is None:
            raise EdgeftError(f"{run.root} was trained with --qat auto but holds no {run.qat_plan.name}")
        return plan.qat_plan()
    return cfg.qat.plan()


def _train_variant(
    cfg: TrainConfig,
    root: Variant,
    model_dir: Path,
    data,
    qat_during_training: bool,
    dist=None,
    device: str | None = None,
    twin: Variant | None = None,
    notes: list[tuple] | None = None,
) -> None:
    """Train one variant into ``root``. ``twin``: the trained float twin (baseline/) that a QAT run distils from
    (``cfg.qat.distill``) and/or starts from (``cfg.qat.init == "baseline"``). ``notes``: info lines held back until
    the model has loaded (then logged and cleared), so that an error loading it is the command's only line."""
    import torch

    from . import qat as qatlib
    from .training import (
        Checkpointing,
        CheckpointManager,
        Evaluation,
        Optimization,
        Placement,
        Reporting,
        TrainData,
        prepare_model,
        train_loop,
    )
    from .training.distributed import barrier
    from .training.model import save_adapter as _save_adapter

    tokenizer, template, train_ex, eval_ex = data
    device = device or cfg.hardware.device
    is_main = dist is None or dist.is_main
    label = f"{'QAT ' + cfg.qat.scheme if qat_during_training else 'train'} ({cfg.model.mode})"
    if cfg.run.resume and root.done():
        log.info("%s: already complete in %s", label, root.root)
        return
    load_dir = model_dir
    init_from = twin if (twin is not None and cfg.qat.init == "baseline") else None
    if init_from is not None and cfg.model.mode == "lora":  # continue the twin's adapter on the same base
        cfg = cfg.replace(adapter=str(init_from.model))
    elif init_from is not None:  # start from the twin's fine-tuned weights
        load_dir = init_from.model
    strategy = None
    if dist is not None:
        from .training import fsdp

        strategy = fsdp.choose(cfg, model_dir, dist.world, device)
        if is_main:
            log.info("%s: %d processes, %s", label, dist.world, "FSDP2" if strategy == "fsdp" else "DDP")
    torch.manual_seed(cfg.optim.seed)
    # FSDP: rank 0 loads on the CPU, the others build the model on meta (no weights); sharding gives every rank its
    # shards of rank 0's weights, on its GPU (training/fsdp.py)
    fsdp_load = ("cpu" if is_main else "meta") if strategy == "fsdp" else None
    model, prep = prepare_model(cfg, load_dir, qat=qat_during_training, device=device, load_device=fsdp_load)
    for note in notes or []:
        log.info(*note)
    if notes:
        notes.clear()
    _set_generation_eos(model, tokenizer)
    plan = cfg.qat.plan()
    ckpt = None
    if cfg.run.save_steps > 0:
        fingerprint = {
            **identity(cfg),
            "variant": "qat" if qat_during_training else "float",
            "processes": dist.world if dist else 1,
        }
        if strategy == "fsdp":  # its optimizer.pt is keyed by parameter name
            fingerprint["distributed"] = "fsdp"
        fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes in state.json
        save_adapter = (lambda d, sd=None: _save_adapter(model, d, sd)) if cfg.model.mode == "lora" else None
        ckpt = CheckpointManager(
            root.checkpoints, cfg.run.save_total_limit, fingerprint, save_adapter, defaults=identity_defaults()
        )
    opt = cfg.optim
    summary = train_loop(
        model,
        TrainData(train_ex, tokenizer.pad_token_id, eval_ex or None, cfg.data.batching, cfg.data.max_seq_length),
        Optimization(
            max_steps=cfg.qat.max_steps if qat_during_training else opt.max_steps,
            batch_size=opt.batch_size,
            lr=cfg.qat.lr if qat_during_training else opt.lr,
            grad_accum=opt.grad_accum,
            weight_decay=opt.weight_decay,
            schedule=opt.schedule,
            warmup_ratio=opt.warmup_ratio,
            warmup_steps=opt.warmup_steps,
            max_grad_norm=opt.max_grad_norm,
            optimizer=opt.optimizer,
            embedding_lr=opt.embedding_lr,
            scale_lr=cfg.qat.scale_lr if qat_during_training else None,
            seed=opt.seed,
        ),
        evaluation=Evaluation(
            cfg.eval.steps, cfg.eval.early_stopping_patience, cfg.eval.early_stopping_threshold, cfg.eval.load_best
        ),
        checkpointing=Checkpointing(ckpt, cfg.run.save_steps, cfg.run.resume),
        reporting=Reporting(
            metrics_path=root.metrics,
            progress=cfg.run.progress,
            desc=label,
            logging_steps=cfg.run.logging_steps,
            report_to=cfg.run.report_to,
            log_dir=root.root,
            run_config=cfg.to_dict(),
        ),
        placement=Placement(device, dist, strategy or "ddp"),
        distill=_distillation(cfg, twin, device, fsdp_load) if (twin is not None and cfg.qat.distill) else None,
    )
    if strategy == "fsdp":
        from .training.fsdp import full_trainable_state

        tensors = full_trainable_state(model)  # a collective: every rank gathers, rank 0 receives
        model = ckpt = None  # frees the shards before rank 0 rebuilds the whole model
        model = _unsharded(cfg, model_dir, tensors, tokenizer, qat_during_training, device, is_main)
    if not is_main:
        barrier(dist)
        return
    scales = qatlib.learned_scales(model) if qatlib.is_prepared(model) else {}  # before unprepare drops them
    if qatlib.is_prepared(model):
        qatlib.unprepare(model)
    if prep["kernels"]:
        from edgeft.kernels import unpatch

        unpatch(model)
    quantized_base = prep["quantized_base"] is not None
    # model/ and converted/ are written from the weights as trained (device and dtype): convert then computes
    # the same scales and integers the fake-quant forward used; the converted model moves to the CPU to be saved
    info = {
        "base_model": str(model_dir),
        "mode": cfg.model.mode,
        "qat": plan.to_dict() if (plan and qat_during_training) else None,
        "kernels": prep["kernels"],
        "gradient_checkpointing": prep.get("gradient_checkpointing"),
        "chat_template": template,
        "quantized_base": prep["quantized_base"],
        "adapter_from": prep["adapter_from"],
        "init_from": str(init_from.root) if init_from is not None else None,
        "distilled_from": str(twin.root) if (twin is not None and cfg.qat.distill) else None,
        "trainable_parameters": prep["trainable_parameters"],
        "learned_scales": len(scales),
        "precision": summary.get("precision"),  # the weight update: fp32, or bf16 through fp32 masters (or other)
        "train": summary,
        "examples": len(train_ex),
        "eval_examples": len(eval_ex),
    }
    with atomic_dir(root.model) as tmp:
        model.save_pretrained(tmp)  # PEFT: adapter only; full: the whole model
        tokenizer.save_pretrained(tmp)
        if scales:  # learned QAT scales: part of the trained model (convert writes them; `edgeft convert` reads them)
            from safetensors.torch import save_file

            save_file({n: t.detach().cpu().contiguous() for n, t in scales.items()}, str(tmp / root.scales.name))
        (tmp / root.model_info.name).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "%s: loss %.4f -> %.4f in %.0fs",
        label,
        summary["first_loss"] or float("nan"),
        summary["final_loss"] or float("nan"),
        summary["seconds"],
    )
    if quantized_base:  # a bitsandbytes base cannot be merged exactly: convert from the float base + adapter
        del model
        model, _ = load_trained(root)
    convert_model(model, tokenizer, plan, root.converted, scales)
    barrier(dist)


def _unsharded(
    cfg: TrainConfig, model_dir: Path, tensors: dict, tokenizer, qat_during_training: bool, device: str, is_main: bool
):
    """After FSDP training: rank 0 rebuilds the model unsharded (on its GPU when it fits, else on the CPU) and loads
    the trained tensors gathered from every rank, so model/ and converted/ are written as for one process."""
    import gc

    import torch

    from .training import fsdp, prepare_model
    from .training.checkpoint import load_trainable

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not is_main:
        return None
    load_device = "cpu"
    n = fsdp._checkpoint_params(model_dir)
    if device.startswith("cuda") and n is not None:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if n * (2 if cfg.hardware.dtype == "bf16" else 4) < 0.8 * free:
            load_device = device
    if load_device == "cpu" and cfg.qat.scheme and qat_during_training and device.startswith("cuda"):
        log.warning(
            "the trained model does not fit one GPU: QAT convert runs on the CPU, whose rounding of a "
            "tie can differ from the GPU's fake quantization in rare weights"
        )
    model, _ = prepare_model(cfg, model_dir, qat=qat_during_training, device=device, load_device=load_device)
    load_trainable(model, tensors, "the weights gathered from the FSDP shards")
    _set_generation_eos(model, tokenizer)
    return model


def _distillation(cfg: TrainConfig, twin: str | Path | Variant, device: str, load_device: str | None = None):
    """The trained float twin as the teacher, in the run's dtype on ``device`` (training/distill.py).

    ``load_device`` (FSDP): "cpu" loads it there for the loop to shard; "meta" builds it without weights (ranks
    other than 0), the loop's sharding then gives it rank 0's.
    """
    import torch

    from .training.distill import Distillation

    twin = Variant(twin)
    dtype = torch.bfloat16 if cfg.hardware.dtype == "bf16" else torch.float32
    if load_device == "meta":
        from .training.model import empty_model

        info = twin.info()
        # load_trained's module: LoRA merged into its base (the base's architecture), or the full model
        teacher = empty_model(info["base_model"] if info["mode"] == "lora" else twin.model, dtype)
    else:
        teacher, _ = load_trained(twin)
        teacher.to(device=load_device or device)
        # parameters only: Module.to(dtype) would also round RoPE's fp32 inv_freq buffer, which the student
        # (loaded by from_pretrained in the same dtype) keeps in fp32
        for prm in teacher.parameters():
            prm.data = prm.data.to(dtype)
    log.info(
        "QAT distils from the float twin %s (KL weight %.2f, %s positions, temperature %g)",
        twin.root,
        cfg.qat.distill,
        cfg.qat.distill_positions,
        cfg.qat.distill_temperature,
    )
    return Distillation(
        teacher, weight=cfg.qat.distill, temperature=cfg.qat.distill_temperature, positions=cfg.qat.distill_positions
    )


def _set_generation_eos(model, tokenizer) -> None:
    """Generation stops at the template's end-of-turn token as well as the model's own EOS."""
    gc = getattr(model, "generation_config", None)
    if gc is None or tokenizer.eos_token_id is None:
        return
    ids = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    ids = [i for i in ids if i is not None]
    if tokenizer.eos_token_id not in ids:
        gc.eos_token_id = [tokenizer.eos_token_id, *ids]


def convert_model(model, tokenizer, plan, out_dir: Path, scales: dict | None = None) -> Path:
    """qat.convert: merge LoRA, quantize per ``plan`` (None: keep float) on the learned ``scales`` if any, write
    ``out_dir`` atomically."""
    from . import qat as qatlib

    if plan is None:
        merged = qatlib.merge_lora(model)
        record: dict[str, Any] = {"plan": None, "linears": [], "skipped": [], "embeddings": []}
        return qatlib.save_converted(merged.to("cpu"), tokenizer, record, out_dir)
    converted, record = qatlib.convert(model, plan, scales)
    return qatlib.save_converted(converted.to("cpu"), tokenizer, record, out_dir)


def convert(run: str | Path | None = None) -> Path:
    """Re-run qat.convert for an existing run from its saved model/ (e.g. after changing convert code)."""
    run = RunDir.find(run)
    for root in run.variants():
        if not root.has_trained_model():
            continue
        from .integrity import check_safetensors_dir

        check_safetensors_dir(root.model, f"train the run again: `edgeft train --out {run.root} --overwrite ...`")
        cfg = load_yaml(run.config_file)
        plan = run_qat_plan(run, cfg)  # the baseline's PTQ quantizes as the QAT run does
        model, tokenizer = load_trained(root)
        convert_model(model, tokenizer, plan, root.converted, saved_scales(root))
    return run.root


def saved_scales(root: str | Path | Variant) -> dict | None:
    """The learned QAT scales saved with the trained model of ``root`` (None: it has none)."""
    path = Variant(root).scales
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


# --- export --------------------------------------------------------------------------------------------


def export(fmt: str, run: str | Path | None = None, quant: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Export the run's converted model as ``pte``, ``gguf`` (``quant``) or ``torchao``; returns the report.

    ``kwargs`` go to the exporter; for ``pte``: ``max_seq_len``, ``max_context_len``, ``dynamic_shape``,
    ``logits`` (``"all"``: ``model.pte``, what :func:`evaluate` runs; ``"last"``: ``model-last.pte`` for apps),
    ``embedding`` and ``kv_cache`` (default: a device-fit plan's KV-cache format, else fp32).
    """
    if fmt not in EXPORT_FORMATS:
        raise EdgeftError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}")
    run = RunDir.find(run)
    src = run.converted
    if not run.has_converted():
        raise EdgeftError(f"{run.root} has no converted model; run `edgeft train` to completion first")
    from .fsutil import remove_stale
    from .integrity import check_safetensors_dir

    check_safetensors_dir(src, f"run `edgeft convert --run {run.root}` to write {src.name}/ again from model/")
    remove_stale(run.exports.path)  # temporary files of an export that was killed
    if fmt == "pte" and kwargs.get("max_context_len") is None:
        from .qat import plan as fit

        fp = fit.load(run.root)
        if fp is not None:  # a device-fit plan budgeted its KV cache at its context: the program holds that cache
            kwargs["max_context_len"] = fp.budget.context
            kwargs["max_seq_len"] = min(kwargs.get("max_seq_len") or 512, fp.budget.context)
    if fmt == "pte" and kwargs.get("kv_cache") is None:
        from .qat import plan as fit

        fp = fit.load(run.root)
        if fp is not None:  # the plan's KV-cache format (its embedding format is already in the converted model)
            kwargs["kv_cache"] = fp.kv_cache
    report = export_dir(fmt, src, run.exports.path, quant=quant, **kwargs)
    if fmt == "gguf":
        # the Ollama Modelfile carries the run's chat template and stop tokens next to the GGUF it names
        from edgeft.exporters import ollama

        try:
            report["modelfile"] = ollama.write_modelfile(report["path"], src)
        except EdgeftError as e:
            report.setdefault("warnings", []).append(f"no Ollama Modelfile: {e}")
    run.exports.record(report.get("name", fmt) if isinstance(report, dict) else fmt, report)
    return report


# --- evaluate -------------------------------------------------------------------------------------------


def evaluate(run: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """BF16 vs PTQ vs QAT on the chosen runtimes; writes ``eval/report.{md,json}`` and plots."""
    from edgeft.devices.evaluate import evaluate_run

    return evaluate_run(find_run(run), **kwargs)


def train_from_yaml(path: str | Path, **overrides: Any) -> Path:
    """Train from a YAML config file with keyword overrides."""
    cfg = load_yaml(path)
    return train(cfg.replace(**overrides))
