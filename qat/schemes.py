"""QAT schemes and presets as data.

A *scheme* says how linear layers are quantized (weights and, optionally, activations) and which torchao config
realises it at convert time; a *preset* names a scheme plus the treatment of embeddings and whether training
should be full fine-tuning. Adding a scheme or preset is a new entry in these tables. torchao is imported lazily
(only when a config is built), so listing schemes costs nothing.

The ``gguf-q4_0``/``gguf-q8_0`` presets train and convert with fp16 scales, so their trained, converted and GGUF
(Q4_0/Q8_0) weights are the same numbers bit for bit; their fake quantizer floors the scale at
:data:`FP16_SCALE_FLOOR`, where torchao's fp16 reciprocal stays finite. Why the grids fit llama.cpp's blocks and
where fake quant and convert may differ: docs/qat.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgeft.errors import EdgeftError

# fake-quant scale floor: 2^-16 + 2^-23, exact in fp16 and bf16, with a finite fp16 reciprocal (65027 < 65504)
FP16_SCALE_FLOOR = 258 * 2.0**-24


@dataclass(frozen=True)
class Scheme:
    """How linear layers are quantized; ``group_size`` None means per output channel (row)."""

    name: str
    description: str
    weight_dtype: str  # "int4" | "int8" | "fp8"
    group_size: int | None
    activation: str | None  # None | "int8-asym-per-token" | "fp8-per-row"
    exporters: tuple[str, ...]
    cuda_convert_only: bool = False  # torchao's convert for this scheme needs CUDA kernels
    group_sizes: tuple[int, ...] = ()  # selectable group sizes (--qat-group-size)
    scale_dtype: str | None = None  # None: torchao's default (fp32 scales); "float16": GGUF-exact scales

    def torchao_config(self, group_size: int | None = None) -> Any:
        """The torchao PTQ config whose convert step writes exactly this scheme's grid."""
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

        gs = group_size or self.group_size
        gran = PerGroup(gs) if gs else PerAxis(0)
        if self.scale_dtype is not None:
            if not (self.weight_dtype in ("int4", "int8") and self.activation is None):
                raise EdgeftError(f"scheme {self.name}: scale_dtype is supported for weight-only int schemes only")
            wdt = torch.int4 if self.weight_dtype == "int4" else torch.int8
            sdt = getattr(torch, self.scale_dtype)
            return IntxWeightOnlyConfig(weight_dtype=wdt, granularity=gran, scale_dtype=sdt)
        if self.weight_dtype in ("int4", "int8") and self.activation == "int8-asym-per-token":
            wdt = torch.int4 if self.weight_dtype == "int4" else torch.int8
            return Int8DynamicActivationIntxWeightConfig(weight_dtype=wdt, weight_granularity=gran)
        if self.weight_dtype in ("int4", "int8") and self.activation is None:
            wdt = torch.int4 if self.weight_dtype == "int4" else torch.int8
            return IntxWeightOnlyConfig(weight_dtype=wdt, granularity=gran)
        if self.weight_dtype == "int4" and self.activation == "fp8-per-row":
            from torchao.quantization import Float8DynamicActivationInt4WeightConfig

            return Float8DynamicActivationInt4WeightConfig()
        if self.weight_dtype == "fp8" and self.activation == "fp8-per-row":
            from torchao.float8.inference import Float8MMConfig
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

            # torchao defaults to cuBLAS "fast accumulation" (reduced-precision partial sums), which moves the
            # converted forward ~1% away from what training's fake quantization computed: accumulate exactly
            return Float8DynamicActivationFloat8WeightConfig(
                granularity=PerRow(), mm_config=Float8MMConfig(use_fast_accum=False)
            )
        raise EdgeftError(f"scheme {self.name}: no torchao config for this combination")

    def fake_quant_configs(self, group_size: int | None = None) -> tuple[Any, Any]:
        """(activation, weight) torchao fake-quant configs that simulate :meth:`torchao_config`'s grid.

        torchao infers them from the base config, except with ``scale_dtype`` (its inference refuses that):
        then the same ``IntxFakeQuantizeConfig`` is built with the scale precision and an fp16-safe floor.
        """
        base = self.torchao_config(group_size)
        if self.scale_dtype is None:
            from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

            return _infer_fake_quantize_configs(base)
        import torch
        from torchao.quantization.qat import IntxFakeQuantizeConfig

        if self.scale_dtype != "float16":
            raise EdgeftError(f"scheme {self.name}: scale_dtype {self.scale_dtype} is not supported (float16 only)")
        weight = IntxFakeQuantizeConfig(
            base.weight_dtype,
            base.granularity,
            base.mapping_type,
            scale_precision=torch.float16,
            eps=FP16_SCALE_FLOOR,
        )
        return None, weight


@dataclass(frozen=True)
class Preset:
    """A named deployment target: a scheme plus embedding treatment and training mode, and optionally the recipe
    that trains it (``recipe``: values of ``edgeft.config.QATSettings`` fields named in its ``RECIPE``, e.g.
    ``{"weight_scale": "learned", "steps_ratio": 3.0}``), filled where the user set nothing (a flag wins)."""

    name: str
    description: str
    scheme: str
    embedding: str | None = None  # None | "int8-per-channel"
    full_finetuning: bool | None = None  # None: keep the user's choice
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme(
            "int8-int4",
            "int8 dynamic per-token asymmetric activations, int4 symmetric per-group-32 weights (ExecuTorch 8da4w)",
            weight_dtype="int4",
            group_size=32,
            activation="int8-asym-per-token",
            exporters=("pte", "gguf", "torchao"),
            group_sizes=(32, 64, 128),
        ),
        Scheme(
            "int4",
            "int4 symmetric per-group weights, activations in float (weight-only)",
            weight_dtype="int4",
            group_size=32,
            activation=None,
            exporters=("pte", "gguf", "torchao"),
            group_sizes=(32, 64, 128),
        ),
        Scheme(
            "int8",
            "int8 symmetric per-channel weights, activations in float (weight-only)",
            weight_dtype="int8",
            group_size=None,
            activation=None,
            exporters=("pte", "gguf", "torchao"),
        ),
        Scheme(
            "fp8-int4",
            "fp8 e4m3 per-row dynamic activations, int4 per-group-128 weights (GPU convert)",
            weight_dtype="int4",
            group_size=128,
            activation="fp8-per-row",
            exporters=("torchao",),
            cuda_convert_only=True,
        ),
        Scheme(
            "fp8-fp8",
            "fp8 e4m3 per-row dynamic activations and per-row weights (GPU convert)",
            weight_dtype="fp8",
            group_size=None,
            activation="fp8-per-row",
            exporters=("torchao",),
            cuda_convert_only=True,
        ),
        Scheme(
            "int4-fp16-scale",
            "int4 symmetric blocks of 32 with one fp16 scale each, weight-only: exactly GGUF Q4_0's weight grid",
            weight_dtype="int4",
            group_size=32,
            activation=None,
            exporters=("gguf", "torchao"),
            scale_dtype="float16",
        ),
        Scheme(
            "int8-fp16-scale",
            "int8 symmetric blocks of 32 with one fp16 scale each, weight-only: exactly GGUF Q8_0's weight grid",
            weight_dtype="int8",
            group_size=32,
            activation=None,
            exporters=("gguf", "torchao"),
            scale_dtype="float16",
        ),
    ]
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "phone-deployment",
            "int8-int4 linears + int8 per-channel embeddings, full fine-tuning: ExecuTorch on Android/iOS; "
            "trained with learned int4 scales for half the fine-tuning steps, at least 180 (docs/accuracy.md)",
            scheme="int8-int4",
            embedding="int8-per-channel",
            full_finetuning=True,
            # measured on the accuracy benchmark (bench/results/accuracy-*-learned*): learned scales need about
            # 180 steps from their max|w| start whatever the fine-tune's length; half the fine-tuning steps keeps a
            # long run's QAT stage under the twin's wall time at the learned step's GPU speed (docs/performance.md)
            recipe={"weight_scale": "learned", "steps_ratio": 0.5, "min_steps": 180},
        ),
        Preset(
            "phone-deployment-learned",
            "experimental: phone-deployment trained with learned int4 scales for 3x the fine-tuning steps (the "
            "opt-in recipe of docs/accuracy.md; not yet the default)",
            scheme="int8-int4",
            embedding="int8-per-channel",
            full_finetuning=True,
            recipe={"weight_scale": "learned", "steps_ratio": 3.0},
        ),
        Preset(
            "gguf-q4_0",
            "llama.cpp Q4_0 bit for bit (int4, blocks of 32, fp16 scales; weight-only: llama.cpp quantizes "
            "activations to Q8_0 itself at run time, which QAT does not simulate)",
            scheme="int4-fp16-scale",
        ),
        Preset(
            "gguf-q8_0",
            "llama.cpp Q8_0 bit for bit (int8, blocks of 32, fp16 scales; weight-only: llama.cpp quantizes "
            "activations to Q8_0 itself at run time, which QAT does not simulate)",
            scheme="int8-fp16-scale",
        ),
    ]
}


@dataclass(frozen=True)
class QATPlan:
    """A resolved scheme-or-preset: what prepare, convert, the exporters and the evaluator all read."""

    name: str  # what the user asked for (scheme or preset name)
    scheme: Scheme
    group_size: int | None
    embedding: str | None
    full_finetuning: bool | None
    weight_scale: str = "absmax"  # how 4-bit weight groups pick their scale: WEIGHT_SCALES
    # linears kept at int8 per output channel, activations as the scheme's: by their own name ("down_proj": in
    # every layer) or by a dotted path ending in it ("layers.3.mlp.down_proj": that one; a device-fit plan's form)
    int8_modules: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheme"] = self.scheme.name
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QATPlan":
        return resolve(
            d["name"],
            group_size=d.get("group_size"),
            weight_scale=d.get("weight_scale", "absmax"),
            int8_modules=tuple(d.get("int8_modules", ())),
            embedding=d.get("embedding") if d["name"] == AUTO else None,
        )

    @property
    def searched_scales(self) -> bool:
        """Whether 4-bit groups search their scale (``mse``; ``learned-mse`` starts from it, and PTQ uses it)."""
        return self.weight_scale in ("mse", "learned-mse")

    @property
    def learned_scales(self) -> bool:
        """Whether QAT trains the 4-bit groups' scales (prepare makes them parameters)."""
        return self.weight_scale.startswith("learned")

    @property
    def ptq_weight_scale(self) -> str:
        """The rule PTQ under this plan picks 4-bit scales by (learned scales exist only after QAT)."""
        return "mse" if self.searched_scales else "absmax"

    def is_int8(self, name: str | None) -> bool:
        """Whether the linear ``name`` (a module path) is one of ``int8_modules`` (its own name, or a path it ends
        in)."""
        return name is not None and any(module_matches(name, m) for m in self.int8_modules)

    def _scheme_for(self, name: str | None) -> tuple[Scheme, int | None]:
        if self.is_int8(name):  # int8 per output channel, the scheme's activations
            return replace(self.scheme, weight_dtype="int8", group_size=None), None
        return self.scheme, self.group_size

    def linear_config(self, name: str | None = None) -> Any:
        """torchao's config for the linear ``name`` (None: the scheme's own linears)."""
        scheme, gs = self._scheme_for(name)
        return scheme.torchao_config(gs)

    def fake_quant_configs(self, name: str | None = None) -> tuple[Any, Any]:
        """(activation, weight) fake-quant configs for linears (LoRA's merged weight and torchao's modules)."""
        scheme, gs = self._scheme_for(name)
        return scheme.fake_quant_configs(gs)

    def qat_prepare_config(self) -> Any:
        """torchao's ``QATConfig`` for the prepare step of plain linears."""
        from torchao.quantization.qat import QATConfig

        if self.scheme.scale_dtype is None:
            return QATConfig(self.linear_config(), step="prepare")
        act, weight = self.fake_quant_configs()
        return QATConfig(activation_config=act, weight_config=weight, step="prepare")

    def embedding_config(self) -> Any:
        """torchao's config for the embedding treatment (None: the embedding stays float)."""
        return None if self.embedding is None else embedding_treatment_config(self.embedding)


# Embedding treatments: (what it is). Group size of the 4-bit one: ExecuTorch's LLM export default (4,32).
EMBEDDING_TREATMENTS: dict[str, str] = {
    "int8-per-channel": "int8 symmetric, one fp32 scale per row (.pte: embedding_byte; GGUF: Q8_0)",
    "int4-per-group": "int4 symmetric in groups of 32, fp32 scales (.pte: embedding_4bit, two codes a byte; GGUF: "
    "Q4_0 under q4_0)",
}
EMBEDDING_INT4_GROUP = 32


def embedding_treatment_config(treatment: str) -> Any:
    """torchao's weight-only config that writes ``treatment``'s grid (:data:`EMBEDDING_TREATMENTS`)."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if treatment == "int8-per-channel":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if treatment == "int4-per-group":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(EMBEDDING_INT4_GROUP))
    raise EdgeftError(f"unknown embedding treatment {treatment!r}; choose from {', '.join(EMBEDDING_TREATMENTS)}")


# How an integer weight group's scale is chosen; both are written as they are by convert (torchao's custom scales) and
# read by every exporter from the converted tensors.
WEIGHT_SCALES: dict[str, str] = {
    "absmax": "max|w| / (qmax - qmin) * 2 per group: torchao's grid",
    "mse": "the fraction of max|w| (13 candidates, 0.69-1.06) with the least squared weight error per 4-bit group, "
    "searched again at every fake quantization and at convert (int8 rows keep max|w|: over a whole row the least "
    "squared error clips the few largest weights, and PTQ answered fewer questions so, bench/README)",
    "learned": "trained with the weights (LSQ in log space, from torchao's max|w| scales; --qat-scale-lr), saved with "
    "the run and written by convert as they were trained; PTQ of the plan uses max|w|",
    "learned-mse": "learned, starting from the mse search's scales (and PTQ of the plan uses the search)",
}


# `--qat auto`: the device-fit plan (qat/plan.py) on this preset's grids, its int8 linears chosen per module
AUTO = "auto"
AUTO_BASE = "phone-deployment"


def module_matches(name: str, entry: str) -> bool:
    """Whether the module path ``name`` is ``entry`` or ends in it at a dot (PEFT's ``base_model.model.`` prefix and
    the plain model's names both match ``layers.3.mlp.down_proj`` and ``down_proj``)."""
    return name == entry or name.endswith("." + entry)


def resolve(
    name: str,
    group_size: int | None = None,
    weight_scale: str = "absmax",
    int8_modules: tuple[str, ...] | list[str] = (),
    embedding: str | None = None,
) -> QATPlan:
    """Look up a scheme or preset by name; one clear error for an unknown name, group size, weight scale or a
    scheme that cannot keep ``int8_modules`` at int8. ``embedding``: the device-fit plan's (``auto`` only)
    treatment, in place of the preset's."""
    if name in PRESETS or name == AUTO:
        p = PRESETS[AUTO_BASE if name == AUTO else name]
        if embedding is not None and name != AUTO:
            raise EdgeftError(f"preset {name}: its embedding treatment is fixed ({p.embedding})")
        if embedding is not None and embedding not in EMBEDDING_TREATMENTS:
            raise EdgeftError(
                f"unknown embedding treatment {embedding!r}; choose from {', '.join(EMBEDDING_TREATMENTS)}"
            )
        scheme, embedding, full = SCHEMES[p.scheme], embedding or p.embedding, p.full_finetuning
    elif name in SCHEMES:
        if embedding is not None:
            raise EdgeftError(f"scheme {name}: embedding treatments come with presets (or auto), not schemes")
        scheme, embedding, full = SCHEMES[name], None, None
    else:
        raise EdgeftError(
            f"unknown QAT scheme {name!r}; schemes: {', '.join(SCHEMES)}; presets: {', '.join(PRESETS)}, {AUTO}"
        )
    gs = group_size if group_size is not None else scheme.group_size
    if group_size is not None and group_size != scheme.group_size and group_size not in scheme.group_sizes:
        allowed = ", ".join(map(str, scheme.group_sizes)) or "none (fixed)"
        raise EdgeftError(f"scheme {scheme.name}: group size {group_size} not supported (choose from {allowed})")
    if weight_scale not in WEIGHT_SCALES:
        raise EdgeftError(f"unknown weight scale {weight_scale!r}; choose from {', '.join(WEIGHT_SCALES)}")
    if weight_scale != "absmax" and (
        scheme.weight_dtype != "int4" or scheme.activation == "fp8-per-row" or scheme.scale_dtype is not None
    ):
        raise EdgeftError(
            f"scheme {scheme.name}: weight scale {weight_scale!r} needs int4 weights with torchao's "
            "scale dtype (int8-int4, int4, phone-deployment)"
        )
    int8_modules = tuple(dict.fromkeys(int8_modules))
    if int8_modules and (
        scheme.weight_dtype != "int4" or scheme.activation == "fp8-per-row" or scheme.scale_dtype is not None
    ):
        raise EdgeftError(
            f"scheme {scheme.name}: int8 modules need int4 integer weights with torchao's scale dtype "
            "(int8-int4, int4, phone-deployment)"
        )
    bad = [
        m
        for m in int8_modules
        if not all(p.isidentifier() or p.isdigit() for p in m.split(".")) or not m.split(".")[-1].isidentifier()
    ]
    if bad:
        raise EdgeftError(
            f"int8 modules are linear names such as down_proj (or paths such as layers.3.mlp.down_proj), not {bad[0]!r}"
        )
    return QATPlan(
        name=name,
        scheme=replace(scheme),
        group_size=gs,
        embedding=embedding,
        full_finetuning=full,
        weight_scale=weight_scale,
        int8_modules=int8_modules,
    )


def preset_recipe(name: str | None) -> tuple[str | None, dict[str, Any]]:
    """The preset whose recipe a scheme-or-preset name carries, and that recipe: (None, {}) for a scheme or no
    name; ``auto`` trains with its base preset's."""
    p = PRESETS.get(AUTO_BASE if name == AUTO else name or "")
    return (p.name, dict(p.recipe)) if p is not None else (None, {})


def describe() -> list[dict[str, str]]:
    """One row per scheme and preset for `edgeft qat list`."""
    rows = []
    for s in SCHEMES.values():
        rows.append(
            {"name": s.name, "kind": "scheme", "description": s.description, "exporters": ",".join(s.exporters)}
        )
    for p in PRESETS.values():
        ex = ",".join(SCHEMES[p.scheme].exporters)
        rows.append({"name": p.name, "kind": "preset", "description": p.description, "exporters": ex})
    rows.append(
        {
            "name": AUTO,
            "kind": "plan",
            "exporters": ",".join(SCHEMES[PRESETS[AUTO_BASE].scheme].exporters),
            "description": f"{AUTO_BASE}'s grids with the most sensitive linears at int8, chosen by calibration "
            "to fit --device / --max-size / --min-decode at --context (qat_plan.json)",
        }
    )
    return rows
