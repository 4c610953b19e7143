"""The config in sections: one field gives its CLI flag, its YAML key and its flat key (derived, not listed); every
flag of the flat config keeps its name and meaning; a flat config.yaml of an older run loads and keeps its identity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import yaml

from edgeft.cli import _train_config, build_parser
from edgeft.config import (
    OptimSettings,
    QATSettings,
    TrainConfig,
    dump_yaml,
    from_dict,
    identity,
    load_yaml,
    option,
    resolve,
)
from edgeft.errors import EdgeftError


@dataclass
class _Optim(OptimSettings):
    ema_decay: float | None = option(low=0, high=1, help="EMA of the weights")


@dataclass
class _QAT(QATSettings):
    freeze_after: int = option(0, low=0, help="freeze the scales after N steps")
    observers: bool = option(True, help="keep the observers on")


class _Config(TrainConfig):
    SECTIONS = tuple({OptimSettings: _Optim, QATSettings: _QAT}.get(s, s) for s in TrainConfig.SECTIONS)


def _train_parser(parser):
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices["train"]


def test_a_new_field_is_a_flag_a_yaml_key_and_a_flat_key_with_no_other_edit(tmp_path):
    parser = build_parser(_Config)
    args = parser.parse_args(
        [
            "train",
            "--ema-decay",
            "0.5",
            "--qat",
            "int4",
            "--qat-freeze-after",
            "3",
            "--no-qat-observers",
            "--max-steps",
            "4",
        ]
    )
    cfg = _train_config(args, _Config)
    assert (cfg.optim.ema_decay, cfg.qat.freeze_after, cfg.qat.observers, cfg.optim.max_steps) == (0.5, 3, False, 4)
    assert "--ema-decay" in _train_parser(parser).format_help()

    nested = yaml.safe_load(dump_yaml(cfg))  # config.yaml: the sections' keys
    assert nested["optim"]["ema_decay"] == 0.5 and nested["qat"]["freeze_after"] == 3
    assert nested["qat"]["observers"] is False
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_yaml(path, _Config) == cfg
    path.write_text("optim: {ema_decay: 0.25}\n")
    assert load_yaml(path, _Config).optim.ema_decay == 0.25
    # the flat form (configs before sections, the Python keyword API) names it by its key
    assert _Config(ema_decay=0.125, qat_freeze_after=2).optim.ema_decay == 0.125
    assert _Config.from_dict({"qat_freeze_after": 7}).qat.freeze_after == 7
    assert _Config(qat="int4").to_flat()["ema_decay"] is None
    assert identity(_Config(qat="int4", ema_decay=0.5))["ema_decay"] == 0.5  # what --resume compares
    # its bounds are checked like every other field's
    with pytest.raises(EdgeftError, match=r"ema_decay must be in \[0, 1\]"):
        _Config(ema_decay=2.0).check()
    with pytest.raises(EdgeftError, match="ema_decay must be a number"):
        _Config.from_dict({"optim": {"ema_decay": "fast"}})
    with pytest.raises(SystemExit):  # argparse's own error for a non-number
        parser.parse_args(["train", "--ema-decay", "fast"])
    # and the real config has none of it
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--ema-decay", "0.5"])
    with pytest.raises(EdgeftError, match="unknown config key"):
        TrainConfig(ema_decay=0.5)


# every flag of `edgeft train` before the config had sections (tests and users call them)
FLAT_ERA_FLAGS = [
    "--config",
    "--model",
    "--out",
    "--resume",
    "--overwrite",
    "--data",
    "--data-split",
    "--chat-template",
    "--system-prompt",
    "--prompt-template",
    "--output-column",
    "--conversation-extension",
    "--max-seq-length",
    "--packing",
    "--no-padding-free",
    "--eval-split",
    "--eval-steps",
    "--early-stopping-patience",
    "--early-stopping-threshold",
    "--no-load-best",
    "--lora",
    "--full",
    "--lora-r",
    "--lora-alpha",
    "--lora-dropout",
    "--lora-bias",
    "--lora-target-modules",
    "--lora-modules-to-save",
    "--rslora",
    "--adapter",
    "--load-in-4bit",
    "--load-in-8bit",
    "--qat",
    "--qat-group-size",
    "--qat-weight-scale",
    "--qat-int8",
    "--ptq",
    "--no-ptq",
    "--qat-distill",
    "--qat-distill-positions",
    "--qat-distill-temperature",
    "--qat-init",
    "--qat-corpus",
    "--dtype",
    "--device",
    "--kernels",
    "--gradient-checkpointing",
    "--distributed",
    "--fsdp",
    "--max-steps",
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--optim",
    "--lr",
    "--embedding-lr",
    "--qat-lr",
    "--qat-scale-lr",
    "--qat-max-steps",
    "--weight-decay",
    "--schedule",
    "--warmup-ratio",
    "--warmup-steps",
    "--max-grad-norm",
    "--seed",
    "--threads",
    "--save-steps",
    "--save-total-limit",
    "--report-to",
    "--logging-steps",
    "--no-progress",
]


def test_every_flat_era_flag_keeps_its_name_and_meaning():
    flags = {s for a in _train_parser(build_parser())._actions for s in a.option_strings}  # noqa: SLF001
    assert set(FLAT_ERA_FLAGS) <= flags, sorted(set(FLAT_ERA_FLAGS) - flags)
    argv = [
        "train",
        "--model",
        "tiny-llama",
        "--full",
        "--no-ptq",
        "--qat",
        "int8-int4",
        "--qat-int8",
        "gate_proj, up_proj",
        "--fsdp",
        "--no-progress",
        "--no-padding-free",
        "--no-load-best",
        "--rslora",
        "--report-to",
        "tensorboard",
        "--lora-target-modules",
        "all-linear,lm_head",
        "--optim",
        "sgd",
        "--qat-lr",
        "1e-4",
        "--eval-split",
        "0.2",
        "--data-split",
        "test",
    ]
    cfg = _train_config(build_parser().parse_args(argv))
    flat = cfg.to_flat()
    assert {
        k: flat[k]
        for k in (
            "model",
            "mode",
            "ptq",
            "qat",
            "qat_int8",
            "distributed",
            "progress",
            "padding_free",
            "load_best",
            "report_to",
            "optim",
            "qat_lr",
            "eval_split",
            "data_split",
        )
    } == {
        "model": "tiny-llama",
        "mode": "full",
        "ptq": False,
        "qat": "int8-int4",
        "qat_int8": ["gate_proj", "up_proj"],
        "distributed": "fsdp",
        "progress": False,
        "padding_free": False,
        "load_best": False,
        "report_to": ["tensorboard"],
        "optim": "sgd",
        "qat_lr": 1e-4,
        "eval_split": 0.2,
        "data_split": "test",
    }
    assert flat["lora"]["use_rslora"] is True and flat["lora"]["target_modules"] == ["all-linear", "lm_head"]
    # flags left out are "not given": the config file's (or the default) value stays
    assert _train_config(build_parser().parse_args(["train"])) == TrainConfig()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--optim", "adam"])  # choices come from train.optim.OPTIMIZERS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--lora", "--full"])


# config.yaml of a run written before sections (edgeft's flat TrainConfig), and what its resume compared
FLAT_ERA_YAML = """\
model: tiny-llama
data: builtin:tasks
data_split: train
out: runs/x
mode: lora
lora: {r: 8, alpha: 32, dropout: 0.0, target_modules: all-linear, bias: none, use_rslora: false, modules_to_save: []}
adapter: null
load_in_4bit: false
load_in_8bit: false
qat: int8-int4
qat_group_size: null
qat_weight_scale: absmax
qat_int8: [down_proj]
ptq: true
qat_distill: 1.0
qat_distill_positions: all
qat_distill_temperature: 1.0
qat_init: baseline
qat_corpus: 0.25
qat_lr: 0.0002
qat_scale_lr: null
qat_max_steps: null
chat_template: null
system_prompt: null
prompt_template: null
output_column: null
conversation_extension: 1
max_seq_length: 512
padding_free: true
packing: false
eval_split: 0.0
eval_steps: null
early_stopping_patience: null
early_stopping_threshold: 0.0
load_best: true
max_steps: 7
epochs: null
batch_size: 8
grad_accum: 1
optim: adamw
lr: 0.0002
embedding_lr: null
weight_decay: 0.0
schedule: cosine
warmup_ratio: 0.1
warmup_steps: null
max_grad_norm: 1.0
dtype: fp32
device: cpu
kernels: auto
gradient_checkpointing: auto
distributed: auto
seed: 42
save_steps: 2
save_total_limit: null
resume: false
overwrite: false
report_to: []
logging_steps: 10
threads: null
progress: true
"""
FLAT_ERA_RESUME_FREE = {
    "out",
    "resume",
    "overwrite",
    "progress",
    "threads",
    "report_to",
    "logging_steps",
    "save_steps",
    "save_total_limit",
}


def test_a_flat_era_config_loads_and_keeps_its_identity(tmp_path):
    old = yaml.safe_load(FLAT_ERA_YAML)
    path = tmp_path / "config.yaml"
    path.write_text(FLAT_ERA_YAML)
    cfg = load_yaml(path)
    assert (cfg.model.name, cfg.lora.r, cfg.qat.scheme, cfg.qat.int8, cfg.optim.max_steps, cfg.run.save_steps) == (
        "tiny-llama",
        8,
        "int8-int4",
        ["down_proj"],
        7,
        2,
    )
    # the flat form is the old file, key for key, plus the keys added since (the device-fit budget, the preset
    # schedule and the twin's generations), at None
    added = {"fit_device", "fit_max_size_mb", "fit_min_decode", "fit_context", "fit_artifact"}
    schedule = {"qat_steps_ratio", "qat_min_steps", "qat_corpus_source", "qat_gen_tokens", "qat_gen_temperature"}
    flat = cfg.to_flat()
    assert set(flat) - set(old) == added | schedule and all(flat[k] is None for k in added | schedule)
    assert {k: v for k, v in flat.items() if k not in added | schedule} == old
    # the identity --resume and the checkpoints compare: the old dict minus the resume-free keys (qat_max_steps
    # only when it differs from max_steps), plus the device-fit keys at their defaults; the schedule's keys are
    # absent while they change nothing (no ratio in it, prose as before, no generations)
    want = {k: v for k, v in old.items() if k not in FLAT_ERA_RESUME_FREE and k != "qat_max_steps"}
    want |= {k: None for k in added}
    assert identity(resolve(cfg)) == want
    assert identity(from_dict(yaml.safe_load(dump_yaml(cfg)))) == want  # the nested file it is rewritten as
    # it was written resolved: resolving changes nothing but the corpus source the run had (prose)
    assert resolve(cfg) == cfg.replace(qat_corpus_source="prose")
    with pytest.raises(EdgeftError, match="unknown config keys: qat_bits"):
        from_dict({**old, "qat_bits": 4})


def test_sections_check_themselves():
    with pytest.raises(EdgeftError, match="lora.r must be at least 1"):
        TrainConfig(lora={"r": 0}).lora.check()
    with pytest.raises(EdgeftError, match="warmup_ratio must be in"):
        TrainConfig(warmup_ratio=1.0).optim.check()
    with pytest.raises(EdgeftError, match="qat_corpus must be in"):
        TrainConfig(qat="int4", qat_corpus=1.5).qat.check()
    with pytest.raises(EdgeftError, match="optim must be one of adamw"):
        TrainConfig(optim="adam").optim.check()
    # "was this set?": None until resolve fills it from the preset, the mode and the recipe
    raw = TrainConfig(qat="phone-deployment")
    assert (raw.model.mode, raw.optim.lr, raw.qat.lr, raw.qat.distill) == (None, None, None, None)
    done = resolve(raw)
    assert (done.model.mode, done.optim.lr, done.qat.lr, done.qat.distill) == ("full", 2e-5, 1e-4, 1.0)
    assert resolve(TrainConfig(qat="phone-deployment", lr=3e-5, qat_distill=0.5)).qat.distill == 0.5
    # sections are copied, never shared between configs
    a = TrainConfig()
    b = a.replace(max_steps=3)
    assert a.optim.max_steps == 60 and b.optim.max_steps == 3 and a.qat is not b.qat
    with pytest.raises(TypeError):
        dataclasses.replace(a, max_steps=3)  # not a dataclass: a flat key would silently reset its section


def _steps(cfg: TrainConfig) -> TrainConfig:
    from edgeft.pipeline import _finalize_steps

    return _finalize_steps(resolve(cfg), [], 1)


def test_a_preset_schedule_fills_what_is_unset_and_sources_say_from_where():
    learned = "preset:phone-deployment-learned"
    cfg = _steps(TrainConfig(model="tiny-llama", qat="phone-deployment-learned", max_steps=7))
    q = cfg.qat
    assert (q.weight_scale, q.scale_lr, q.steps_ratio, q.max_steps) == ("learned", 5e-3, 3.0, 21)
    assert {k: q.sources[k] for k in ("weight_scale", "steps_ratio", "max_steps", "scale_lr", "lr", "distill")} == {
        "weight_scale": learned,
        "steps_ratio": learned,
        "max_steps": learned,
        "scale_lr": "default",
        "lr": "default",
        "distill": "default",
    }
    assert cfg.qat.plan().learned_scales and cfg.model.mode == "full"
    # a flag wins, even one equal to the generic default, and is told from it
    cfg = _steps(
        TrainConfig(model="tiny-llama", qat="phone-deployment-learned", max_steps=7, qat_weight_scale="absmax")
    )
    assert (cfg.qat.weight_scale, cfg.qat.sources["weight_scale"], cfg.qat.scale_lr) == ("absmax", "flag", None)
    # --qat-max-steps (absolute) wins over the preset's ratio; --qat-steps-ratio over the preset's
    cfg = _steps(TrainConfig(model="tiny-llama", qat="phone-deployment-learned", max_steps=7, qat_max_steps=9))
    assert (cfg.qat.max_steps, cfg.qat.steps_ratio, cfg.qat.sources["max_steps"]) == (9, None, "flag")
    cfg = _steps(TrainConfig(model="tiny-llama", qat="phone-deployment-learned", max_steps=7, qat_steps_ratio=1.5))
    assert (cfg.qat.max_steps, cfg.qat.sources["max_steps"]) == (11, "flag")  # ceil(10.5)
    # phone-deployment's recipe: learned scales, half the fine-tuning steps, at least 180
    cfg = _steps(TrainConfig(model="tiny-llama", qat="phone-deployment", max_steps=7))
    assert (cfg.qat.weight_scale, cfg.qat.max_steps, cfg.qat.steps_ratio) == ("learned", 180, 0.5)
    assert cfg.qat.sources["max_steps"] == "preset:phone-deployment"
    assert _steps(TrainConfig(model="tiny-llama", qat="phone-deployment", max_steps=1000)).qat.max_steps == 500
    # without the twin the QAT run is the fine-tune: the preset's schedule does not lengthen it
    cfg = _steps(TrainConfig(model="tiny-llama", qat="phone-deployment", ptq=False, max_steps=7))
    assert (cfg.qat.weight_scale, cfg.qat.max_steps, cfg.qat.steps_ratio, cfg.qat.min_steps) == (
        "learned",
        7,
        None,
        None,
    )
    # a scheme carries no recipe: the generic defaults, the QAT run as long as the twin
    cfg = _steps(TrainConfig(model="tiny-llama", qat="int8-int4", max_steps=7))
    assert (cfg.qat.weight_scale, cfg.qat.max_steps, cfg.qat.steps_ratio) == ("absmax", 7, None)
    assert set(cfg.qat.sources.values()) == {"default"} and cfg.qat.preset_choices() == {}


def test_steps_ratio_and_max_steps_agree_or_fail_in_one_line(tmp_path, capsys):
    from edgeft import cli

    with pytest.raises(EdgeftError, match="--qat-max-steps 9 and --qat-steps-ratio 2 .*disagree: give one"):
        _steps(TrainConfig(model="tiny-llama", qat="int4", max_steps=7, qat_max_steps=9, qat_steps_ratio=2.0))
    assert _steps(TrainConfig(qat="int4", max_steps=7, qat_max_steps=14, qat_steps_ratio=2.0)).qat.max_steps == 14
    with pytest.raises(EdgeftError, match="--qat-steps-ratio sets the QAT run's steps: it needs --qat"):
        resolve(TrainConfig(qat_steps_ratio=2.0))
    with pytest.raises(EdgeftError, match="--qat-corpus-source generations samples the trained float twin"):
        resolve(TrainConfig(qat="int4", ptq=False, qat_corpus=0.25, qat_corpus_source="generations"))
    with pytest.raises(EdgeftError, match="--qat-gen-tokens shapes the twin's generations"):
        resolve(TrainConfig(qat="int4", qat_gen_tokens=8))
    out = tmp_path / "r"
    args = ["train", "--model", "tiny-llama", "--qat", "int4", "--max-steps", "7", "--qat-max-steps", "9"]
    assert cli.main([*args, "--qat-steps-ratio", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagree" in err[0] and not out.exists()


def test_a_preset_floor_raises_short_qat_runs_and_only_its_own_ratio(monkeypatch):
    """A preset's ``min_steps`` floors the steps its ratio gives (learned scales need steps however short the
    fine-tune); given steps or a given ratio are taken as they are; given steps below a given floor fail."""
    from dataclasses import replace

    from edgeft.qat import schemes

    base = schemes.PRESETS["phone-deployment-learned"]
    floored = replace(base, name="floored", recipe={"weight_scale": "learned", "steps_ratio": 0.5, "min_steps": 12})
    monkeypatch.setitem(schemes.PRESETS, "floored", floored)
    q = _steps(TrainConfig(model="tiny-llama", qat="floored", max_steps=7)).qat
    assert (q.max_steps, q.min_steps, q.sources["max_steps"]) == (12, 12, "preset:floored")  # ceil(3.5) < 12
    q = _steps(TrainConfig(model="tiny-llama", qat="floored", max_steps=40)).qat
    assert (q.max_steps, q.sources["max_steps"]) == (20, "preset:floored")  # the ratio above the floor
    q = _steps(TrainConfig(model="tiny-llama", qat="floored", max_steps=7, qat_steps_ratio=1.0)).qat
    assert (q.max_steps, q.min_steps) == (7, None)  # a given ratio drops the preset's floor
    q = _steps(TrainConfig(model="tiny-llama", qat="floored", max_steps=7, qat_max_steps=5)).qat
    assert (q.max_steps, q.min_steps) == (5, None)
    q = _steps(TrainConfig(model="tiny-llama", qat="int4", max_steps=7, qat_min_steps=9)).qat
    assert (q.max_steps, q.sources["max_steps"]) == (9, "flag")
    with pytest.raises(EdgeftError, match="--qat-max-steps 5 is below --qat-min-steps 9"):
        _steps(TrainConfig(model="tiny-llama", qat="int4", max_steps=7, qat_max_steps=5, qat_min_steps=9))
    # resolved and reloaded (config.yaml on --resume): the same steps, no disagreement, the same identity
    cfg = _steps(TrainConfig(model="tiny-llama", qat="floored", max_steps=7))
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert _steps(again).qat.max_steps == 12 and identity(_steps(again)) == identity(cfg)
    assert "qat_min_steps" not in identity(cfg)


def test_a_preset_schedule_run_resumes_with_the_same_identity():
    """config.yaml holds the resolved values (the ratio and the steps it gave): reloaded, every value is given,
    the preset changes nothing, and the identity --resume compares is the same."""
    cfg = _steps(
        TrainConfig(model="tiny-llama", qat="phone-deployment-learned", max_steps=7, qat_corpus_source="mixed")
    )
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert identity(resolve(again)) == identity(cfg) == identity(_steps(again))
    assert set(_steps(again).qat.sources.values()) == {"flag"}
    assert "qat_steps_ratio" not in identity(cfg) and identity(cfg)["qat_max_steps"] == 21
    assert identity(cfg)["qat_corpus_source"] == "mixed" and identity(cfg)["qat_gen_tokens"] == 96


def test_every_preset_recipe_names_recipe_settings_that_check():
    from edgeft.qat.schemes import PRESETS

    for name, p in PRESETS.items():
        assert set(p.recipe) <= set(QATSettings.RECIPE) - {"max_steps"}, name
        cfg = _steps(TrainConfig(model="tiny-llama", qat=name))  # checks every section
        assert {k for k, v in cfg.qat.sources.items() if v == f"preset:{name}" and k != "max_steps"} == set(p.recipe)
