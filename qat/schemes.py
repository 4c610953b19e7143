"""QAT schemes and presets as data.

A *scheme* says how linear layers are quantized (weights and, optionally, activations) and which torchao
config realises it at convert time; a *preset* names a scheme plus the treatment of embeddings and whether
training should be full fine-tuning. Adding a scheme or preset is a new entry in these tables.

torchao is imported lazily (only when a config is built), so listing schemes costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgeft.errors import EdgeftError


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

    def torchao_config(self, group_size: int | None = None) -> Any:
        """The torchao PTQ config whose convert step writes exactly this scheme's grid."""
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

        gs = group_size or self.group_size
        gran = PerGroup(gs) if gs else PerAxis(0)
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
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        raise EdgeftError(f"scheme {self.name}: no torchao config for this combination")


@dataclass(frozen=True)
class Preset:
    """A named deployment target: a scheme plus embedding treatment and training mode."""

    name: str
    description: str
    scheme: str
    embedding: str | None = None  # None | "int8-per-channel"
    full_finetuning: bool | None = None  # None: keep the user's choice
    extra: dict[str, Any] = field(default_factory=dict)


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
    ]
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "phone-deployment",
            "int8-int4 linears + int8 per-channel embeddings, full fine-tuning: ExecuTorch on Android/iOS",
            scheme="int8-int4",
            embedding="int8-per-channel",
            full_finetuning=True,
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scheme"] = self.scheme.name
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "QATPlan":
        return resolve(d["name"], group_size=d.get("group_size"))

    def linear_config(self) -> Any:
        return self.scheme.torchao_config(self.group_size)

    def embedding_config(self) -> Any:
        if self.embedding is None:
            return None
        if self.embedding == "int8-per-channel":
            import torch
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerAxis

            return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
        raise EdgeftError(f"unknown embedding treatment {self.embedding!r}")


def resolve(name: str, group_size: int | None = None) -> QATPlan:
    """Look up a scheme or preset by name; one clear error for an unknown name or group size."""
    if name in PRESETS:
        p = PRESETS[name]
        scheme, embedding, full = SCHEMES[p.scheme], p.embedding, p.full_finetuning
    elif name in SCHEMES:
        scheme, embedding, full = SCHEMES[name], None, None
    else:
        raise EdgeftError(
            f"unknown QAT scheme {name!r}; schemes: {', '.join(SCHEMES)}; presets: {', '.join(PRESETS)}"
        )
    gs = group_size if group_size is not None else scheme.group_size
    if group_size is not None and group_size != scheme.group_size and group_size not in scheme.group_sizes:
        allowed = ", ".join(map(str, scheme.group_sizes)) or "none (fixed)"
        raise EdgeftError(f"scheme {scheme.name}: group size {group_size} not supported (choose from {allowed})")
    return QATPlan(name=name, scheme=replace(scheme), group_size=gs, embedding=embedding, full_finetuning=full)


def describe() -> list[dict[str, str]]:
    """One row per scheme and preset for `edgeft qat list`."""
    rows = []
    for s in SCHEMES.values():
        rows.append({"name": s.name, "kind": "scheme", "description": s.description, "exporters": ",".join(s.exporters)})
    for p in PRESETS.values():
        ex = ",".join(SCHEMES[p.scheme].exporters)
        rows.append({"name": p.name, "kind": "preset", "description": p.description, "exporters": ex})
    return rows
