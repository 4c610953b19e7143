"""Typed configuration in sections. Each section is a dataclass that checks itself; the ``train`` CLI flags, the YAML
keys and the flat keys of older runs are derived from its fields' metadata (:func:`option`), so an option is written
once: one field (+ its use). The sections (``TrainConfig.SECTIONS``): model, lora, data, eval, qat (the scheme and
the twin -> QAT recipe), optim, hardware, run; docs/config.md says what each holds and how to add an option.

A field's *key* is its name before sections (``qat_lr``, ``lora.r``, ``data``): section prefix + field name unless
the metadata names it. The flag is ``--`` + the key with dashes (``--qat-lr``, ``--lora-r``) unless overridden; the
YAML form is ``section: {field: value}``; a ``config.yaml`` of the old flat form loads through the keys, and
:func:`identity` (what ``--resume`` and checkpoints compare) is still taken over the keys, so old runs resume.

``None`` means "not set": :func:`resolve` fills it from other settings (the preset, the mode, the device, the
recipe's defaults in :meth:`QATSettings.resolved`). Whether a field was given is ``value is not None`` before
:func:`resolve`. The resolved config is written to the run's ``config.yaml``; loading it reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import EdgeftError

QAT_FROM_TWIN_MIN_LR = 1e-4  # a weight must move about an int4 step (~max|w|/7.5) to change its integer
LEARNED_SCALE_LR = 5e-3  # learned QAT scales (their logs): lr 1e-3 moves a scale by about 0.1% a step


class Registry:
    """Choices held by a registry elsewhere (``"module:NAME"``: a tuple, or a dict's keys), imported only when the
    choices are needed (checking a value, printing help), so building the parser or a config stays cheap."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def names(self) -> tuple[str, ...]:
        module, attr = self.ref.split(":")
        return tuple(getattr(import_module(module), attr))

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, value: object) -> bool:
        return value in self.names()

    def __repr__(self) -> str:
        return f"Registry({self.ref!r})"


def option(
    default: Any = None,
    *,
    help: str = "",
    key: str | None = None,
    flag: str | bool | None = None,
    choices: tuple | Registry | None = None,
    cli_choices: bool = True,
    metavar: str | None = None,
    negatable: str | None = None,
    consts: dict[str, tuple[Any, str]] | None = None,
    low: float | None = None,
    low_open: bool = False,
    high: float | None = None,
    high_open: bool = False,
    note: str = "",
    resume_free: bool = False,
    factory: Any = None,
) -> Any:
    """A config field with what the CLI, YAML and checks need to know about it.

    ``key``: the flat key, if not section prefix + name. ``flag``: the CLI flag, if not ``--`` + key with dashes
    (a bool defaulting to True gets ``--no-...``); ``False``: no valued flag (only ``consts``). ``choices``: a
    tuple or a :class:`Registry`; the CLI enforces them unless ``cli_choices`` is False (the section's ``check``
    then gives its own error). ``negatable``: a bool gets both ``--x`` and ``--no-x`` (this is the latter's help).
    ``consts``: extra flags that store a constant, ``{"--fsdp": ("fsdp", help)}``. ``low``/``high`` bound numbers
    (``*_open``: exclusive); ``note`` explains the bound in the error. ``resume_free``: may change on ``--resume``
    (it does not change what training computes).
    """
    meta = dict(
        help=help,
        key=key,
        flag=flag,
        choices=choices,
        cli_choices=cli_choices,
        metavar=metavar,
        negatable=negatable,
        consts=consts or {},
        low=low,
        low_open=low_open,
        high=high,
        high_open=high_open,
        note=note,
        resume_free=resume_free,
    )
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _bound_error(key: str, value: Any, m: dict) -> str | None:
    lo, hi = m["low"], m["high"]
    bad = (lo is not None and (value <= lo if m["low_open"] else value < lo)) or (
        hi is not None and (value >= hi if m["high_open"] else value > hi)
    )
    if not bad:
        return None
    if hi is not None:
        what = f"in {'(' if m['low_open'] else '['}{lo:g}, {hi:g}{')' if m['high_open'] else ']'}"
    elif m["low_open"]:
        what = "positive" if lo == 0 else f"above {lo:g}"
    else:
        what = f"at least {lo:g}"
    return f"{key} must be {what}{' (' + m['note'] + ')' if m['note'] else ''}, not {value!r}"


class Section:
    """Base of the config sections: derived names, generic checks (choices, bounds), mapping I/O."""

    NAME: ClassVar[str] = ""  # attribute of TrainConfig and YAML key
    TITLE: ClassVar[str] = ""  # the CLI help group
    PREFIX: ClassVar[str] = ""  # of the flat keys ("qat_", "lora." for a section nested in the flat form too)

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The section's options (internal fields, such as :attr:`QATSettings.sources`, are not options)."""
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    def to_dict(self) -> dict[str, Any]:
        """The options by field name (the YAML form of the section)."""
        return {f.name: _copy(getattr(self, f.name)) for f in self.options()}

    @classmethod
    def key(cls, f: dataclasses.Field) -> str:
        return f.metadata.get("key") or cls.PREFIX + f.name

    @classmethod
    def types(cls) -> dict[str, Any]:
        return _types(cls)

    def check(self) -> None:
        """Validate this section alone (choices, bounds, then the section's own rules); one EdgeftError line."""
        types = self.types()
        for f in self.options():
            v, m, key = getattr(self, f.name), f.metadata, self.key(f)
            if v is None:
                continue
            if m.get("choices") is not None and m.get("cli_choices", True):
                choices = tuple(m["choices"])
                for item in v if isinstance(v, list) else [v]:
                    if item not in choices:
                        raise EdgeftError(f"{key} must be one of {', '.join(map(str, choices))}, not {item!r}")
            if (m.get("low") is not None or m.get("high") is not None) and base_type(types[f.name]) in (int, float):
                err = _bound_error(key, v, m)
                if err:
                    raise EdgeftError(err)

    @classmethod
    def from_mapping(cls, d: dict[str, Any], where: str = "") -> Section:
        """The section from a mapping of its field names (YAML), values type-checked; unknown keys are one error."""
        names = {f.name for f in cls.options()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EdgeftError(f"unknown {where or cls.NAME} keys: {', '.join(unknown)}")
        types = cls.types()
        return cls(
            **{k: _coerce(cls.key(next(f for f in cls.options() if f.name == k)), v, types[k]) for k, v in d.items()}
        )


def _copy(v: Any) -> Any:
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v


@lru_cache(maxsize=None)
def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(tp: Any) -> Any:
    """The plain type of a field's annotation: int for ``int | None``, list for ``list[str]`` and
    ``str | list[str]``, else the annotation itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in args):
        return list
    if args:
        return base_type(args[0])
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """A YAML value in the field's type: numbers may come as strings ("1e-4" is a string to YAML 1.1); a comma list
    as one string; anything else of the wrong type is one error line."""
    if value is None:
        return None
    base = base_type(tp)
    if base is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if base is list and isinstance(value, str):
        return value if str in typing.get_args(tp) else [x.strip() for x in value.split(",") if x.strip()]
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,)}.get(base)
    bad = ok and (not isinstance(value, ok) or (base is not bool and isinstance(value, bool)))
    if base is list and not bad:  # YAML lists of names: every item a string
        bad = not all(isinstance(x, str) for x in value)
    if bad:
        kind = {
            bool: "true or false",
            int: "a whole number",
            float: "a number",
            str: "a string",
            list: "a list of strings",
        }[base]
        raise EdgeftError(
            f"{key} must be {kind}{' or null' if type(None) in typing.get_args(tp) else ''}, not {value!r}"
        )
    return value


# --- the sections ------------------------------------------------------------------------------------------------


@dataclass
class ModelSettings(Section):
    """Which model is trained, and how: LoRA adapters or every weight, from a saved adapter, on a 4-/8-bit base."""

    NAME: ClassVar[str] = "model"
    TITLE: ClassVar[str] = "model"

    name: str = option(
        "smollm2-135m", key="model", help="built-in name (see `edgeft models`), HF directory, .gguf file or hub id"
    )
    mode: str | None = option(
        None,
        choices=("lora", "full"),
        flag=False,
        consts={"--lora": ("lora", "LoRA adapters (peft)"), "--full": ("full", "full fine-tuning")},
        help="lora or full; default: the QAT preset's choice, else lora",
    )
    adapter: str | None = option(help="continue training a saved LoRA adapter (PEFT directory or edgeft run)")
    load_in_4bit: bool = option(False, help="QLoRA: NF4 base (bitsandbytes)")
    load_in_8bit: bool = option(False, help="8-bit base (bitsandbytes)")

    def check(self) -> None:
        super().check()
        if self.load_in_4bit and self.load_in_8bit:
            raise EdgeftError("choose one of --load-in-4bit and --load-in-8bit")


@dataclass
class LoraSettings(Section):
    """LoRA adapter settings (peft). dropout is 0 by default: with QAT the forward is then exactly the deployed
    merged weight (with dropout, qat/prepare.py adds a zero-mean correction during training only)."""

    NAME: ClassVar[str] = "lora"
    TITLE: ClassVar[str] = "LoRA"
    PREFIX: ClassVar[str] = "lora."  # nested in the flat form too

    r: int = option(16, help="adapter rank", low=1)
    alpha: int = option(32, help="scaling numerator: alpha/r (alpha/sqrt(r) with --rslora)")
    dropout: float = option(0.0, help="adapter dropout", low=0, high=1, high_open=True)
    target_modules: str | list[str] = option(
        "all-linear", help="all-linear (default), a list, or e.g. all-linear,lm_head,embed_tokens"
    )
    bias: str = option("none", choices=("none", "all", "lora_only"), help="which biases train")
    use_rslora: bool = option(False, flag="--rslora", help="rank-stabilised LoRA: scale by alpha/sqrt(r)")
    modules_to_save: list[str] = option(factory=list, help="modules trained in full next to the adapters")


@dataclass
class DataSettings(Section):
    """Where the examples come from and how they become batches."""

    NAME: ClassVar[str] = "data"
    TITLE: ClassVar[str] = "data"

    path: str = option(
        "builtin:tasks",
        key="data",
        help="builtin:tasks, a .jsonl/.json/.csv/.tsv/.parquet/.txt file, or a hub dataset name",
    )
    split: str = option("train", key="data_split", help="split of a hub dataset")
    chat_template: str | None = option(
        choices=Registry("edgeft.data.templates:TEMPLATES"),
        cli_choices=False,
        help="chat template from the registry (see `edgeft templates`); default: the model's own",
    )
    system_prompt: str | None = option(help="system prompt for conversations that have none")
    prompt_template: str | None = option(help="merge columns: 'Age {Age}.[[ Fare {Fare}.]]' ([[ ]]: optional)")
    output_column: str | None = option(help="with --prompt-template: the column to learn to answer")
    conversation_extension: int = option(1, low=1, help="merge N rows into one multi-turn conversation")
    max_seq_length: int = option(512, low=1, help="tokens per example (and per packed row)")
    padding_free: bool = option(True, help="right-pad micro-batches instead of flattening them")
    packing: bool = option(False, help="pack examples into max-seq-length rows")

    @property
    def batching(self) -> str:
        """The batch layout (data/batching.py): "packed", "padding_free" (flattened, no pad tokens) or "padded"."""
        return "packed" if self.packing else ("padding_free" if self.padding_free else "padded")

    def check(self) -> None:
        super().check()
        if self.chat_template is not None:
            from edgeft.data.templates import get_template

            get_template(self.chat_template)  # its own error names the registry


@dataclass
class EvalSettings(Section):
    """Evaluation during training: the held-out share, how often, early stopping and which weights are kept."""

    NAME: ClassVar[str] = "eval"
    TITLE: ClassVar[str] = "evaluation"
    PREFIX: ClassVar[str] = "eval_"

    split: float = option(
        0.0, low=0, note="a share below 1 or a count", help="held-out share (<1) or count of examples for eval loss"
    )
    steps: int | None = option(low=1, help="evaluate every N steps (default: 10 times per run)")
    early_stopping_patience: int | None = option(
        key="early_stopping_patience", low=1, help="stop after N evaluations without improvement"
    )
    early_stopping_threshold: float = option(
        0.0, key="early_stopping_threshold", help="minimum eval-loss improvement (default 0)"
    )
    load_best: bool = option(True, key="load_best", help="save the last weights, not the best-eval ones")

    def check(self) -> None:
        if not self.split >= 0 or (self.split >= 1 and self.split != int(self.split)):  # 1.5 examples: a typo
            raise EdgeftError(f"eval_split must be a share below 1 or a whole count of examples, not {self.split}")
        super().check()
        if self.early_stopping_patience and self.split <= 0:
            raise EdgeftError("early stopping needs an evaluation set: pass --eval-split")


@dataclass
class QATSettings(Section):
    """Quantization-aware training: the scheme, and the recipe that trains it (qat/, recipes/twin_qat.py).

    With a scheme and ``ptq`` (the default) the float twin is trained first; the QAT run then starts from its weights
    (``init``), learns to reproduce it (``distill``) on the data mixed with generic prose (``corpus``), at a
    learning rate floored so weights cross quantization steps (``lr``), for ``max_steps`` (or ``steps_ratio`` times
    the fine-tuning steps). The ``None`` defaults are the recipe's, filled by :meth:`resolved`: a value given (flag,
    YAML, Python) wins over the preset's recipe (``qat.schemes.Preset.recipe``), which wins over the generic
    default; :attr:`sources` records which one each :attr:`RECIPE` value came from.
    """

    NAME: ClassVar[str] = "qat"
    TITLE: ClassVar[str] = "QAT and its recipe"
    PREFIX: ClassVar[str] = "qat_"
    # the recipe's settings: what a preset may choose (Preset.recipe) and :attr:`sources` reports
    RECIPE: ClassVar[tuple[str, ...]] = (
        "weight_scale",
        "scale_lr",
        "distill",
        "init",
        "corpus",
        "corpus_source",
        "gen_tokens",
        "gen_temperature",
        "lr",
        "steps_ratio",
        "min_steps",
        "max_steps",
    )
    WEIGHT_SCALE: ClassVar[str] = "absmax"  # the generic default
    GEN_TOKENS: ClassVar[int] = 96  # a generation's new tokens at most: with its prompt about a prose chunk's 128
    GEN_TEMPERATURE: ClassVar[float] = 1.0  # sample the twin's own distribution (0: greedy)

    scheme: str | None = option(
        key="qat", help="QAT scheme or preset (see `edgeft qat list`), or auto: a plan fitted to --device"
    )
    group_size: int | None = option(low=1, help="int4 weight group size (default: the scheme's)")
    weight_scale: str | None = option(
        choices=Registry("edgeft.qat.schemes:WEIGHT_SCALES"),
        help="how int4 weight groups choose their scale: absmax (torchao's; default unless the preset chooses), "
        "mse (least squared error of 13 fractions of max|w|, in training and convert; the PTQ baseline uses it "
        "too), or learned / learned-mse "
        "(trained with the weights from absmax / mse scales; --qat-scale-lr)",
    )
    int8: list[str] = option(
        factory=list,
        metavar="NAMES",
        help="linears kept at int8 per output channel in an int4 scheme, by name: e.g. "
        "gate_proj,up_proj (the scheme's activations; exported as such to .pte, GGUF Q8_0 "
        "and TorchAO)",
    )
    ptq: bool = option(
        True,
        key="ptq",
        negatable="skip the no-QAT baseline",
        help="with --qat, also train without QAT for the BF16/PTQ comparison (default)",
    )
    distill: float | None = option(
        low=0,
        high=1,
        note="the KL weight",
        metavar="W",
        help="with --qat: KL weight of distilling the trained no-QAT twin into the QAT "
        "model, 0-1 (default 1: the QAT model learns to reproduce the float model; "
        "0: labels only)",
    )
    distill_positions: str = option(
        "all",
        choices=("all", "targets"),
        help="with --qat-distill: distil every position (all, default) or only the "
        "labelled ones (targets: your data's answers and the --qat-corpus prose)",
    )
    distill_temperature: float = option(
        1.0, low=0, low_open=True, metavar="T", help="temperature of the KL (default 1)"
    )
    init: str | None = option(
        choices=("baseline", "pretrained"),
        help="with --qat: start QAT from the twin's fine-tuned weights (baseline, default) or "
        "from the pretrained model",
    )
    corpus: float | None = option(
        low=0,
        high=1,
        high_open=True,
        note="a share of the training examples",
        metavar="SHARE",
        help="with --qat: share of the QAT run's training examples drawn from edgeft's "
        "packaged generic prose (or the twin's generations: --qat-corpus-source), so the quantized model follows "
        "the float one beyond your data (default 0.25 when distilling, else 0)",
    )
    corpus_source: str | None = option(
        choices=("prose", "generations", "mixed"),
        help="what the --qat-corpus examples are: chunks of the packaged prose (default), the trained twin's own "
        "generations (continuations of prompts from your data and the prose openings, sampled once after the twin "
        "trains and saved in the run), or half of each (mixed)",
    )
    gen_tokens: int | None = option(low=1, metavar="N", help="new tokens of each twin generation at most (default 96)")
    gen_temperature: float | None = option(
        low=0,
        metavar="T",
        help="sampling temperature of the twin's generations, seeded by --seed (default 1: the twin's own "
        "distribution; 0: greedy)",
    )
    lr: float | None = option(
        low=0,
        low_open=True,
        help="learning rate of the QAT run (default: --lr, at least 1e-4 when QAT starts from the twin)",
    )
    scale_lr: float | None = option(
        low=0,
        low_open=True,
        help="learning rate of learned QAT scales, in log space (default 5e-3 with --qat-weight-scale learned)",
    )
    max_steps: int | None = option(
        low=1,
        help="optimizer steps of the QAT run (default: --qat-steps-ratio x --max-steps; the no-QAT twin trains "
        "--max-steps)",
    )
    steps_ratio: float | None = option(
        low=0,
        low_open=True,
        metavar="R",
        help="QAT steps as a multiple of the fine-tuning steps: the QAT run trains ceil(R x --max-steps) (default: "
        "the preset's, else 1); with --qat-max-steps both must agree",
    )
    min_steps: int | None = option(
        low=1,
        metavar="N",
        help="the QAT run trains at least N optimizer steps when its steps come from the ratio (default: the "
        "preset's floor, else none): learned scales need a number of steps to move from their max|w| start, "
        "however short the fine-tune",
    )
    # where each RECIPE value came from ("flag": given by a flag, YAML or Python; "preset:<name>"; "default"), filled
    # by resolved() and the pipeline's step count; not an option (no flag, no YAML key, not compared)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False, metadata={"internal": True})
    # --qat auto: the chosen plan's embedding treatment (pipeline.apply_fit_plan, from qat_plan.json, which records it;
    # the config keeps the request), so that QAT trains and convert writes the plan's embedding, not the preset's
    fit_embedding: str | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    @property
    def twin(self) -> bool:
        """A float twin is trained beside the QAT run (its BF16/PTQ baseline)."""
        return bool(self.scheme and self.ptq)

    @property
    def from_twin(self) -> bool:
        """The QAT run learns from the trained twin (distils from it and/or starts at it): the twin trains first."""
        return self.twin and bool(self.distill or self.init == "baseline")

    def plan(self) -> Any:
        """The QAT plan (``edgeft.qat.QATPlan``) of these settings; None without a scheme."""
        if self.scheme is None:
            return None
        from edgeft.qat import resolve as resolve_qat

        weight_scale = self.weight_scale or self.preset_recipe()[1].get("weight_scale", self.WEIGHT_SCALE)
        return resolve_qat(self.scheme, self.group_size, weight_scale, tuple(self.int8), embedding=self.fit_embedding)

    def preset_recipe(self) -> tuple[str | None, dict[str, Any]]:
        """The preset named by ``scheme`` and its recipe (``qat.schemes.Preset.recipe``); (None, {}) for a scheme."""
        from edgeft.qat.schemes import preset_recipe

        return preset_recipe(self.scheme)

    def resolved(self, lr: float) -> QATSettings:
        """The recipe's values for what is unset, given the run's learning rate ``lr``: the preset's recipe first,
        then the generic defaults: with the twin, distil from it (weight 1), start from its weights, mix in 25%
        prose, at a learning rate of at least 1e-4; without it, labels only from the pretrained model at ``lr``;
        absmax scales (learned ones at lr 5e-3); the twin's generations of at most 96 tokens at temperature 1.
        ``sources`` records where each came from. (``max_steps`` is filled once epochs are known, by
        :meth:`resolve_steps`.)"""
        q = dataclasses.replace(self, sources={})
        preset, recipe = q.preset_recipe()
        unknown = sorted(set(recipe) - set(self.RECIPE) | ({"max_steps"} & set(recipe)))  # steps: as a ratio
        if unknown:  # a registry entry's typo: fail loudly, never silently ignore it
            raise EdgeftError(f"preset {preset}: its recipe names unknown settings {', '.join(unknown)}")
        for name in self.RECIPE:
            if getattr(q, name) is not None:
                q.sources[name] = "flag"
            elif name in recipe and not (
                (name == "steps_ratio" and q.max_steps is not None)  # a flag's steps win
                # the preset's floor belongs to its ratio: given steps or a given ratio are taken as they are
                or (name == "min_steps" and (self.max_steps is not None or self.steps_ratio is not None))
                # a schedule relative to the twin: without one the QAT run is the fine-tune (--max-steps)
                or (name in ("steps_ratio", "min_steps") and not q.twin)
            ):
                setattr(q, name, recipe[name])
                q.sources[name] = f"preset:{preset}"

        def default(name: str, value: Any) -> None:
            if getattr(q, name) is None and value is not None:
                setattr(q, name, value)
                q.sources[name] = "default"

        default("weight_scale", self.WEIGHT_SCALE)
        default("distill", 1.0 if q.twin else 0.0)
        default("init", "baseline" if q.twin else "pretrained")
        default("corpus", 0.25 if q.distill > 0 else 0.0)
        default("corpus_source", "prose")
        if q.generates:
            default("gen_tokens", self.GEN_TOKENS)
            default("gen_temperature", self.GEN_TEMPERATURE)
        default("lr", max(lr, QAT_FROM_TWIN_MIN_LR) if (q.scheme and q.init == "baseline") else lr)
        if q.weight_scale.startswith("learned"):
            default("scale_lr", LEARNED_SCALE_LR)
        return q

    def resolve_steps(self, max_steps: int) -> QATSettings:
        """``max_steps`` of the QAT run once the fine-tuning steps ``max_steps`` are known (after epochs): given,
        else ``ceil(steps_ratio x max_steps)`` (or ``max_steps`` without a ratio), raised to ``min_steps``. Given
        both steps and a ratio, they must agree (a resolved ``config.yaml`` holds both); given steps must reach
        ``min_steps``; one error line when they do not."""
        import math

        q = dataclasses.replace(self, sources=dict(self.sources))
        by_ratio = math.ceil(q.steps_ratio * max_steps - 1e-9) if q.steps_ratio is not None else None
        base = by_ratio if by_ratio is not None else max_steps
        derived = max(base, q.min_steps or 0)
        if q.max_steps is None:
            q.max_steps = derived
            if derived > base:
                q.sources["max_steps"] = q.sources.get("min_steps", "flag")
            else:
                q.sources["max_steps"] = q.sources.get("steps_ratio", "flag") if by_ratio is not None else "default"
        elif by_ratio is not None and derived != q.max_steps:
            floor = f", at least --qat-min-steps {q.min_steps}" if q.min_steps else ""
            raise EdgeftError(
                f"--qat-max-steps {q.max_steps} and --qat-steps-ratio {q.steps_ratio:g} (= {derived} QAT steps of "
                f"--max-steps {max_steps}{floor}) disagree: give one of them"
            )
        elif q.min_steps and q.max_steps < q.min_steps:
            raise EdgeftError(f"--qat-max-steps {q.max_steps} is below --qat-min-steps {q.min_steps}: give one of them")
        return q

    @property
    def generates(self) -> bool:
        """The QAT run's extra examples include the twin's own generations (``corpus_source``)."""
        return bool(self.scheme and self.corpus and self.corpus_source in ("generations", "mixed"))

    def preset_choices(self) -> dict[str, Any]:
        """The recipe values that came from the preset (after :meth:`resolved`), by field name."""
        return {k: getattr(self, k) for k, v in self.sources.items() if v.startswith("preset:")}

    def check(self) -> None:
        if self.int8 and self.scheme is None:
            raise EdgeftError("--qat-int8 needs --qat (an int4 scheme)")
        if self.scheme is not None:
            from edgeft.qat import check_convertible

            check_convertible(self.plan())  # an unknown or unconvertible scheme fails now, not after training
        super().check()
        if self.corpus and not self.scheme:
            raise EdgeftError("--qat-corpus mixes generic prose into a QAT run: it needs --qat")
        if (self.distill or self.init == "baseline") and not self.twin:
            raise EdgeftError(
                "--qat-distill and --qat-init baseline learn from the float twin: they need --qat and "
                "the baseline (drop --no-ptq)"
            )
        if self.scale_lr is not None and not (self.weight_scale or "").startswith("learned"):
            raise EdgeftError(
                "--qat-scale-lr is the learning rate of learned scales: it needs --qat-weight-scale learned"
            )
        if self.corpus_source in ("generations", "mixed") and self.corpus and not self.from_twin:
            raise EdgeftError(
                f"--qat-corpus-source {self.corpus_source} samples the trained float twin: it needs the twin recipe "
                "(--qat with the baseline, distilling from it or starting at it)"
            )
        given = [f"--qat-gen-{n}" for n in ("tokens", "temperature") if getattr(self, f"gen_{n}") is not None]
        if given and self.corpus_source is not None and not self.generates:
            raise EdgeftError(
                f"{given[0]} shapes the twin's generations: it needs --qat-corpus-source generations or mixed "
                "and a positive --qat-corpus"
            )


@dataclass
class FitSettings(Section):
    """The budget of ``--qat auto``: a quantization plan chosen to fit a phone (qat/plan.py, ``qat_plan.json``).

    ``device`` is also given as ``--device PROFILE`` (a torch device is never a profile name)."""

    NAME: ClassVar[str] = "fit"
    TITLE: ClassVar[str] = "device fit (--qat auto: a quantization plan chosen to fit a phone; qat_plan.json)"
    PREFIX: ClassVar[str] = "fit_"

    device: str | None = option(flag=False, help="device profile the plan fits (see `edgeft devices list`)")
    max_size_mb: float | None = option(
        flag="--max-size", metavar="MB", help="largest .pte / GGUF file allowed, in MB (2^20 bytes)"
    )
    min_decode: float | None = option(
        flag="--min-decode",
        metavar="TOK_S",
        help="decode-speed floor in tokens/s on --device (at the profile's low bandwidth efficiency)",
    )
    context: int | None = option(
        flag="--context", metavar="N", help="tokens of context the KV cache is budgeted for (default 2048)"
    )
    artifact: str | None = option(
        flag="--fit-artifact",
        choices=("pte", "gguf", "both"),
        help="which file must fit (default both; GGUF's Q4_0 blocks cannot shrink below group size 32's)",
    )

    def given(self) -> list[str]:
        """The flags of the budget values that were set, in field order."""
        flags = {
            "device": "--device PROFILE",
            "max_size_mb": "--max-size",
            "min_decode": "--min-decode",
            "context": "--context",
            "artifact": "--fit-artifact",
        }
        return [flags[f.name] for f in self.options() if getattr(self, f.name) is not None]

    def budget(self) -> Any:
        """The device-fit budget (``edgeft.qat.plan.Budget``)."""
        from edgeft.qat.plan import DEFAULT_CONTEXT, Budget

        return Budget(
            self.device, self.max_size_mb, self.min_decode, self.context or DEFAULT_CONTEXT, self.artifact or "both"
        )


@dataclass
class OptimSettings(Section):
    """How long and how the weights are updated: steps, batch, optimizer, learning rate and schedule, seed."""

    NAME: ClassVar[str] = "optim"
    TITLE: ClassVar[str] = "optimisation"

    max_steps: int = option(60, low=1, help="optimizer steps")
    epochs: float | None = option(low=0, low_open=True, help="train this many epochs (sets max-steps)")
    batch_size: int = option(8, low=1, help="examples (packed rows) per micro-batch and process")
    grad_accum: int = option(1, low=1, help="micro-batches per optimizer step")
    optimizer: str = option(
        "adamw",
        key="optim",
        choices=Registry("edgeft.training.optim:OPTIMIZERS"),
        help="the optimizer (8-bit and paged ones need bitsandbytes)",
    )
    lr: float | None = option(low=0, low_open=True, help="peak learning rate (default: 2e-4 LoRA, 2e-5 full)")
    embedding_lr: float | None = option(low=0, low_open=True, help="learning rate of embed_tokens/lm_head parameters")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices only)")
    schedule: str = option(
        "cosine", choices=Registry("edgeft.training.optim:SCHEDULES"), help="learning-rate schedule after warmup"
    )
    warmup_ratio: float = option(0.1, low=0, high=1, high_open=True, help="warmup share of the steps")
    warmup_steps: int | None = option(low=0, help="overrides --warmup-ratio")
    max_grad_norm: float = option(1.0, help="gradient clipping norm")
    seed: int = option(42, help="seed of the data order, the split and the model's initialisation")


@dataclass
class HardwareSettings(Section):
    """Where and in what precision training runs: dtype, device, kernels, gradient checkpointing, several GPUs."""

    NAME: ClassVar[str] = "hardware"
    TITLE: ClassVar[str] = "hardware and distributed"

    dtype: str | None = option(choices=("fp32", "bf16"), help="training dtype (default: bf16 on CUDA, fp32 on CPU)")
    device: str | None = option(
        help="torch device (default: cuda if available, else cpu), or with --qat "
        "auto a device profile to fit (see `edgeft devices list`)"
    )
    kernels: str = option(
        "auto", choices=("auto", "on", "off"), help="edgeft's fused Triton kernels (auto: on the GPU)"
    )
    gradient_checkpointing: str = option(
        "auto",
        choices=("auto", "off", "plain", "offload"),
        help="auto (default): none when the activations fit the GPU, else plain (each layer's input kept on the "
        "GPU), else offload (kept in pinned host memory); off: never",
    )
    distributed: str = option(
        "auto",
        choices=Registry("edgeft.training.fsdp:STRATEGIES"),
        consts={"--fsdp": ("fsdp", "--distributed fsdp")},
        help="under torchrun: ddp (a replica per GPU), fsdp (FSDP2, sharded: models that do not fit one GPU) or "
        "auto (fsdp when DDP would not fit; default)",
    )
    threads: int | None = option(low=1, resume_free=True, help="torch CPU threads")


@dataclass
class RunSettings(Section):
    """Where the run goes and what it leaves: the run directory, resuming, checkpoints, logging."""

    NAME: ClassVar[str] = "run"
    TITLE: ClassVar[str] = "run directory, checkpoints and logging"

    out: str | None = option(resume_free=True, help="run directory (default runs/<model>-<time>)")
    resume: bool = option(
        False,
        resume_free=True,
        help="continue the run in --out from its newest checkpoint (its config.yaml is the default)",
    )
    overwrite: bool = option(False, resume_free=True, help="replace an existing run in --out")
    save_steps: int = option(
        0, low=0, note="0: no checkpoints", resume_free=True, help="checkpoint every N steps and at the end (0: none)"
    )
    save_total_limit: int | None = option(low=1, resume_free=True, help="keep the newest K checkpoints (and the best)")
    report_to: list[str] = option(
        factory=list,
        choices=Registry("edgeft.training.report:REPORTERS"),
        cli_choices=False,
        resume_free=True,
        help="tensorboard,wandb",
    )
    logging_steps: int = option(10, low=1, resume_free=True, help="log-line interval without a progress bar")
    progress: bool = option(True, resume_free=True, help="log lines instead of a progress bar")

    def check(self) -> None:
        super().check()
        from edgeft.training.report import check_report_to

        check_report_to(self.report_to)  # names, and that the reporter's package is installed


# --- the whole config ---------------------------------------------------------------------------------------------


class TrainConfig:
    """Everything ``edgeft train`` needs, in sections (``cfg.qat.lr``, ``cfg.optim.max_steps``).

    Built from sections and/or flat keys: ``TrainConfig(model="smollm2-135m", qat="int8-int4", max_steps=20)``
    (a key names a field of any section, as ``edgeft train`` flags do); :meth:`replace` likewise. Not a dataclass,
    so ``dataclasses.replace`` (which would reset a section given by its flat key) fails loudly; use :meth:`replace`.
    """

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        ModelSettings,
        LoraSettings,
        DataSettings,
        EvalSettings,
        QATSettings,
        FitSettings,
        OptimSettings,
        HardwareSettings,
        RunSettings,
    )
    model: ModelSettings
    lora: LoraSettings
    data: DataSettings
    eval: EvalSettings
    qat: QATSettings
    optim: OptimSettings
    hardware: HardwareSettings
    run: RunSettings

    def __init__(self, **values: Any) -> None:
        for cls in self.SECTIONS:
            given = values.get(cls.NAME)
            setattr(self, cls.NAME, dataclasses.replace(given) if isinstance(given, cls) else cls())
        flat = {k: v for k, v in values.items() if not isinstance(v, Section)}
        wrong = [k for k, v in values.items() if isinstance(v, Section) and not isinstance(v, self._section(k))]
        if wrong:
            raise EdgeftError(f"config section {wrong[0]!r} given as a {type(values[wrong[0]]).__name__}")
        self._set_flat(flat)

    @classmethod
    def _section(cls, name: str) -> type[Section] | None:
        return next((s for s in cls.SECTIONS if s.NAME == name), None)

    @classmethod
    def keys(cls) -> dict[str, tuple[str, str]]:
        """Every flat key -> (section name, field name), in section order."""
        return _keys(cls)

    def _set_flat(self, flat: dict[str, Any]) -> None:
        keys = self.keys()
        updates: dict[str, dict[str, Any]] = {}
        for k, v in flat.items():
            sec = self._section(k)
            if sec is not None and sec.PREFIX.endswith(".") and isinstance(v, dict):  # {"lora": {"r": 8}}
                self._set_flat({sec.PREFIX + name: x for name, x in v.items()})
                continue
            if k not in keys:
                raise EdgeftError(f"unknown config key {k!r}")
            s, name = keys[k]
            updates.setdefault(s, {})[name] = _coerce(k, v, self._section(s).types()[name])
        for s, vals in updates.items():
            setattr(self, s, dataclasses.replace(getattr(self, s), **vals))

    def replace(self, **values: Any) -> TrainConfig:
        """A copy with sections and/or flat keys replaced (flat keys change only their field)."""
        new = type(self)(**{cls.NAME: getattr(self, cls.NAME) for cls in self.SECTIONS})
        for k, v in values.items():
            if isinstance(v, Section):
                if not isinstance(v, new._section(k) or ()):
                    raise EdgeftError(f"config section {k!r} given as a {type(v).__name__}")
                setattr(new, k, dataclasses.replace(v))
        new._set_flat({k: v for k, v in values.items() if not isinstance(v, Section)})
        return new

    def get(self, key: str) -> Any:
        """The value of a flat key (``"qat_lr"``, ``"lora.r"``, ``"model"``), as :meth:`keys` names them."""
        keys = self.keys()
        if key not in keys:
            raise EdgeftError(f"unknown config key {key!r}")
        s, name = keys[key]
        return getattr(getattr(self, s), name)

    def sections(self) -> list[Section]:
        return [getattr(self, cls.NAME) for cls in self.SECTIONS]

    def to_dict(self) -> dict[str, Any]:
        """The nested form (``config.yaml``): ``{section: {field: value}}``."""
        return {cls.NAME: getattr(self, cls.NAME).to_dict() for cls in self.SECTIONS}

    def to_flat(self) -> dict[str, Any]:
        """The flat form of configs before sections (keys as :meth:`keys`; ``lora`` nested as it was then)."""
        out: dict[str, Any] = {}
        for k, (s, name) in self.keys().items():
            v = getattr(getattr(self, s), name)
            v = json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v  # a copy
            if "." in k:
                head, tail = k.split(".", 1)
                out.setdefault(head, {})[tail] = v
            else:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a mapping (YAML): section mappings (``qat: {scheme: int4}``) and/or flat keys (``qat: int4``,
        ``max_steps: 5``: the form of configs before sections); unknown keys are one error line."""
        cfg = cls()
        keys = cls.keys()
        for k, v in d.items():
            sec = cls._section(k)
            if sec is not None and k not in keys and not isinstance(v, dict):
                raise EdgeftError(f"config key {k!r} must be a mapping ({', '.join(f.name for f in sec.options())})")
        unknown = sorted(k for k, v in d.items() if k not in keys and not (cls._section(k) and isinstance(v, dict)))
        if unknown:
            raise EdgeftError(f"unknown config keys: {', '.join(unknown)}")
        for k, v in d.items():
            sec = cls._section(k)
            if sec is not None and isinstance(v, dict):
                setattr(cfg, k, sec.from_mapping(v))
            else:
                cfg._set_flat({k: v})
        return cfg

    def check(self) -> None:
        """Validate every section, then the rules across sections; one EdgeftError line for the first problem."""
        for s in self.sections():
            s.check()
        m, q = self.model, self.qat
        if q.max_steps is not None and not q.scheme and q.max_steps != self.optim.max_steps:
            raise EdgeftError("--qat-max-steps sets the QAT run's steps: it needs --qat")
        if q.steps_ratio is not None and not q.scheme:
            raise EdgeftError("--qat-steps-ratio sets the QAT run's steps: it needs --qat")
        if (m.load_in_4bit or m.load_in_8bit) and m.mode != "lora":
            raise EdgeftError(
                "4-/8-bit loading trains LoRA adapters on a frozen quantized base; it cannot do full "
                "fine-tuning (drop --full or the QAT preset that asks for it)"
            )
        if (m.load_in_4bit or m.load_in_8bit) and q.scheme:
            raise EdgeftError(
                "--qat needs a float base: QAT fake-quantizes the merged float weight, which a "
                "bitsandbytes-quantized base does not have"
            )
        if m.adapter and m.mode != "lora":
            raise EdgeftError("--adapter continues a LoRA adapter; it needs LoRA mode")
        if self.hardware.distributed == "fsdp":
            from edgeft.training.fsdp import check_supported

            check_supported(self)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.sections() == other.sections()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{s.NAME}={s!r}' for s in self.sections())})"


@lru_cache(maxsize=None)
def _keys(cls: type[TrainConfig]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for sec in cls.SECTIONS:
        for f in sec.options():
            k = sec.key(f)
            if k in out:
                raise TypeError(f"config key {k!r} is declared twice ({out[k]} and {(sec.NAME, f.name)})")
            out[k] = (sec.NAME, f.name)
    return out


def resume_free_keys(cls: type[TrainConfig] = TrainConfig) -> frozenset[str]:
    """Keys that may change when resuming: they do not affect what training computes (``resume_free`` fields)."""
    return frozenset(
        k
        for k, (s, name) in cls.keys().items()
        if next(f for f in cls._section(s).options() if f.name == name).metadata.get("resume_free")
    )


RESUME_FREE_KEYS = resume_free_keys()


def identity(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config's flat form minus the keys a resume may change: two runs with equal identities compute
    the same. Flat (the keys before sections), so checkpoints of older runs compare equal.

    ``qat_max_steps`` appears only when it differs from ``max_steps``: a run saved before the key existed (or with
    it unset) trained its QAT run for ``max_steps``, so its config and checkpoints still match. Likewise the keys
    added with preset schedules appear only when they change what is trained: ``qat_steps_ratio`` and
    ``qat_min_steps`` never (the QAT run's length is ``qat_max_steps``; they only derive it), ``qat_corpus_source``
    unless prose (what every run before it mixed in), ``qat_gen_*`` when set."""
    free = resume_free_keys(type(cfg))
    out = {k: v for k, v in cfg.to_flat().items() if k not in free}
    if out.get("qat_max_steps") in (None, out.get("max_steps")):
        out.pop("qat_max_steps", None)
    out.pop("qat_steps_ratio", None)
    out.pop("qat_min_steps", None)  # like the ratio, it only derives qat_max_steps
    if out.get("qat_corpus_source") in (None, "prose"):
        out.pop("qat_corpus_source", None)
    for k in ("qat_gen_tokens", "qat_gen_temperature"):
        if out.get(k) is None:
            out.pop(k, None)
    return out


def identity_defaults() -> dict[str, Any]:
    """Every identity key's default, flattened like :func:`flat_keys` ("lora.r") and in its JSON form: a checkpoint
    written before a key existed lacks it, and matches a current run that leaves the key at this value."""
    # the weight scale defaults to None ("the preset's, else absmax"); runs before the key trained absmax
    return json.loads(json.dumps(flat_keys(identity(TrainConfig(qat_weight_scale=QATSettings.WEIGHT_SCALE)))))


def config_diff(saved: TrainConfig, current: TrainConfig) -> list[str]:
    a, b = flat_keys(identity(saved)), flat_keys(identity(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, keys joined with dots ("lora.r"): how configs and fingerprints are compared."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build a config from a mapping (YAML, nested or the older flat form), rejecting unknown keys with one line."""
    return TrainConfig.from_dict(d)


def load_yaml(path: str | Path, config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise EdgeftError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EdgeftError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgeftError(f"{path}: expected a mapping of config keys")
    try:
        return config_cls.from_dict(data)
    except EdgeftError as e:
        raise EdgeftError(f"{path.name}: {e}") from None


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def fit_budget(cfg: TrainConfig) -> Any:
    """The device-fit budget (``edgeft.qat.plan.Budget``) of a ``--qat auto`` config."""
    return cfg.fit.budget()


def _resolve_fit(cfg: TrainConfig) -> None:
    """``--device PROFILE`` names the target phone (torch devices are never profile names); the fit options need
    ``--qat auto`` and a readable budget; the plan, not the user, picks ``--qat-int8``."""
    from edgeft.devices.profiles import PROFILES
    from edgeft.qat.schemes import AUTO

    hw, f, q = cfg.hardware, cfg.fit, cfg.qat
    if hw.device in PROFILES:
        if f.device not in (None, hw.device):
            raise EdgeftError(f"two target devices: --device {hw.device} and fit_device {f.device}")
        f.device, hw.device = hw.device, None
    if q.scheme != AUTO:
        given = f.given()
        if given:
            raise EdgeftError(f"{given[0]} sets the budget of a device-fit plan: it needs --qat auto")
        return
    if q.int8:
        raise EdgeftError("--qat auto chooses the int8 linears itself (qat_plan.json): drop --qat-int8")
    f.budget().check()


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on the machine, the QAT preset and the recipe; validate every section."""
    cfg = cfg.replace()
    m, hw, o, q = cfg.model, cfg.hardware, cfg.optim, cfg.qat
    if q.int8 and q.scheme is None:
        raise EdgeftError("--qat-int8 needs --qat (an int4 scheme)")
    _resolve_fit(cfg)
    plan = q.plan()  # an unknown scheme fails here, before anything else is read
    if m.mode is None:
        m.mode = "full" if (plan is not None and plan.full_finetuning) else "lora"
    if hw.device is None:
        import torch

        hw.device = "cuda" if torch.cuda.is_available() else "cpu"
    if hw.dtype is None:
        hw.dtype = "bf16" if hw.device.startswith("cuda") else "fp32"
    if o.lr is None:
        o.lr = 2e-4 if m.mode == "lora" else 2e-5
    o.check()  # before the QAT lr that defaults to it: a bad --lr is named as the flag the user gave
    cfg.qat = q.resolved(o.lr)
    cfg.check()
    return cfg
