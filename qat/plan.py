"""The device-fit plan (``--qat auto``): which format each tensor takes so that the model fits a phone, as data.

Guarantees:
- calibration (:func:`calibrate`) measures, on the model QAT starts from and the run's training examples, each
  linear's task-loss rise on the int4 grid at every candidate group size (``sensitivity.linear_sensitivity``)
  and the embedding's at each of its formats (``sensitivity.embedding_sensitivity``); its result is cached by
  content (:func:`calibration_key`), so another budget for one fine-tune reuses it;
- the size model (:func:`tensor_bytes`, :func:`artifact_bytes`) is per artifact, from the formats the exporters
  write; runtime memory and decode speed are ``devices.profiles.estimate``, the function ``devices check`` runs;
- the chooser (:func:`choose`) returns, among candidates (group size x embedding x KV-cache format) whose all-int4
  form fits the budget, at the finest group size that fits, the one with the least predicted loss rise after greedy
  int8 upgrades (largest rise per extra byte first, while the budgeted artifacts fit); nothing fits: one
  ``EdgeftError`` naming the smallest plan and its size;
- the plan is ``qat_plan.json`` in the run (:meth:`FitPlan.write`, :func:`load`: every tensor's format, bytes and
  why), and :meth:`FitPlan.qat_plan` trains exactly it (phone-deployment's grids, the chosen group size, the
  chosen linears at int8 by module path), which prepare, convert and both exporters carry;
- the embedding's formats are measured too (their loss rise counts in a candidate's); an int8 KV cache (``.pte``),
  unmeasured, is chosen only when no plan without it fits (``UNMEASURED``).

The method, its approximations and measured size-model errors: docs/device-fit.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

log = logging.getLogger("edgeft")

BASE_PRESET = "phone-deployment"  # schemes.AUTO_BASE: 8da4w linears + int8 embeddings, the fast .pte route
MB = 2**20  # as `edgeft devices check` prints
DEFAULT_CONTEXT = 2048
ARTIFACTS = ("pte", "gguf")
# bytes of a file that are not weights, fitted to exported files (docs/device-fit.md): the .pte's program, delegate
# headers and constant methods grow with the layers (tiny-llama, 4 layers: 89,344; SmolLM2-135M, 30: 532,096); the
# GGUF's tensor infos and alignment per tensor, its header (its vocabulary is counted from the tokenizer)
PTE_OVERHEAD = 21_000
PTE_OVERHEAD_PER_LAYER = 17_000
GGUF_TENSOR_OVERHEAD = 96  # name, dims, type, offset and alignment padding per tensor
GGUF_FIXED = 4096  # header, architecture metadata, chat template

# embedding formats: (preset embedding treatment, None) when available, (None, why not) otherwise
EMBEDDING_FORMATS: dict[str, tuple[str | None, str | None]] = {
    "int8": ("int8-per-channel", None),
    "int4": ("int4-per-group", None),  # .pte embedding_4bit, GGUF Q4_0 (groups of 32)
}
# KV-cache formats: (bytes per element in the .pte, in llama.cpp) when available, or why not. The .pte's int8 cache
# also holds an fp32 scale and an int8 zero point per (position, head): + 5 / head_dim a element (_kv_bytes). A GGUF
# does not choose llama.cpp's cache type (a runtime option): it stays f16 whatever the plan.
KV_FORMATS: dict[str, tuple[tuple[float, float] | None, str | None]] = {
    "fp32": ((4, 2), None),  # ExecuTorch's cache is fp32; llama.cpp's default is f16
    "int8": ((1, 2), None),  # ExecuTorch's quantized KV cache (exporters/pte.py _int8_kv_sdpa)
}
# formats a plan takes only when none without them fits; choose drops the embedding from this list when it is given
# the embedding's measured rises (calibrate measures them, plan_for_model passes them)
UNMEASURED = {"embedding": "int4", "kv_cache": "int8"}


@dataclass(frozen=True)
class Budget:
    """What the plan must meet: a device profile's app memory at ``context`` (when ``device``), an artifact size
    cap in MB (2^20 bytes) and a decode-speed floor in tokens/s (at the profile's low bandwidth efficiency)."""

    device: str | None = None
    max_size_mb: float | None = None
    min_decode: float | None = None
    context: int = DEFAULT_CONTEXT
    artifact: str = "both"  # which file must fit: "pte", "gguf" or "both" (GGUF's Q4_0 cannot shrink below g32's)

    @property
    def targets(self) -> tuple[str, ...]:
        return ARTIFACTS if self.artifact == "both" else (self.artifact,)

    def check(self) -> None:
        """One clear error for a budget that says nothing or cannot be read."""
        if self.device is None and self.max_size_mb is None:
            raise EdgeftError("--qat auto needs a budget: --device PROFILE (its app memory) and/or --max-size MB")
        if self.min_decode is not None and self.device is None:
            raise EdgeftError("--min-decode needs --device (the decode estimate uses the profile's bandwidth)")
        if self.device is not None:
            from edgeft.devices.profiles import get_profile

            get_profile(self.device)
        if self.max_size_mb is not None and not self.max_size_mb > 0:
            raise EdgeftError(f"--max-size must be positive (MB), not {self.max_size_mb}")
        if self.min_decode is not None and not self.min_decode > 0:
            raise EdgeftError(f"--min-decode must be positive (tokens/s), not {self.min_decode}")
        if self.context < 1:
            raise EdgeftError(f"--context must be at least 1, not {self.context}")
        if self.artifact not in (*ARTIFACTS, "both"):
            raise EdgeftError(f"--fit-artifact must be pte, gguf or both, not {self.artifact!r}")


@dataclass(frozen=True)
class Linear:
    name: str
    rows: int  # out_features
    cols: int  # in_features


@dataclass(frozen=True)
class ModelShape:
    """What the size model needs of a model: its linears, the embedding, the other (float) tensors, the shape."""

    linears: tuple[Linear, ...]
    embedding: tuple[int, int]  # (vocab, hidden)
    float_params: int  # norms and biases: F32 in both artifacts
    float_tensors: int
    config: dict[str, Any]  # devices.profiles.shape_of_config
    vocab_bytes: int = 0  # GGUF's tokenizer metadata (gguf_vocab_bytes)


def model_shape(model: Any, tokenizer_dir: str | Path | None = None) -> ModelShape:
    """The :class:`ModelShape` of a transformers model (tied heads counted once per use: convert unties them)."""
    from torch import nn

    from edgeft.devices.profiles import shape_of_config

    linears, seen = [], set()
    for n, m in model.named_modules():
        if type(m) is nn.Linear:
            linears.append(Linear(n, m.out_features, m.in_features))
            seen.update(id(p) for p in m.parameters(recurse=False) if p.dim() == 2)
    emb = model.get_input_embeddings().weight
    seen.add(id(emb))
    rest = [p for p in model.parameters() if id(p) not in seen]
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelShape(
        tuple(linears),
        tuple(emb.shape),
        sum(p.numel() for p in rest),
        len(rest),
        shape_of_config(cfg.to_dict()),
        gguf_vocab_bytes(tokenizer_dir) if tokenizer_dir else 0,
    )


def gguf_vocab_bytes(tokenizer_dir: str | Path) -> int:
    """Bytes of the vocabulary a GGUF holds (``tokenizer.ggml.tokens``/``token_type``/``merges``, and ``scores``
    for SentencePiece-style vocabularies: each string 8 bytes of length plus its UTF-8, each type and score 4), from
    ``tokenizer.json``."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return 0
    tj = json.loads(path.read_text())
    model = tj.get("model", {})
    vocab = model.get("vocab") or {}
    tokens = vocab.keys() if isinstance(vocab, dict) else [t[0] for t in vocab]
    spm = (
        model.get("type") == "Unigram"
        or model.get("byte_fallback")
        or "\u2581" in json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")])
    )  # as exporters.gguf._is_sentencepiece
    total = sum(8 + len(t.encode()) + 4 + (4 if spm else 0) for t in tokens)
    for m in model.get("merges") or []:
        total += 8 + len((m if isinstance(m, str) else " ".join(m)).encode())
    return total


def tensor_bytes(fmt: str, rows: int, cols: int, artifact: str) -> int:
    """Bytes of one 2-D weight in ``fmt`` (``int4-gN``, ``int8``, ``emb-int8``, ``emb-int4``, ``float``) as
    ``artifact`` stores
    it (module docstring; ``exporters.pte._expected_bytes`` and ``exporters.gguf._exact_blocks``)."""
    n = rows * cols
    if artifact == "pte":
        if fmt.startswith("int4-g"):
            return n // 2 + (n // int(fmt[6:])) * 2  # nibbles + bf16 group scales (XNNPACK qb4w)
        if fmt == "int8":
            return n + rows * 2  # 8da8w: int8 rows, one scale per row (as _expected_bytes counts it)
        if fmt == "emb-int8":
            return n + rows * 4  # embedding_byte: int8 rows, fp32 scales
        if fmt == "emb-int4":
            return n // 2 + (n // 32) * 4  # embedding_4bit: two codes a byte, fp32 scales per group of 32
        return n * 4
    if artifact == "gguf":
        if fmt.startswith("int4-g"):
            return n // 32 * 18  # Q4_0: a group of 64/128 is 2/4 blocks repeating its scale
        if fmt == "emb-int4":
            return n // 32 * 18  # Q4_0 (groups of 32)
        if fmt in ("int8", "emb-int8"):
            return n // 32 * 34  # Q8_0
        return n // 32 * 34 if cols % 32 == 0 else n * 2  # exact export: float 2-D -> Q8_0 (F16 if rows misfit)
    raise EdgeftError(f"unknown artifact {artifact!r}")


def _linear_format(lin: Linear, group_size: int | None, int8: bool) -> str:
    if int8:
        return "int8"
    if group_size and lin.cols % group_size:
        return "float"  # convert leaves a linear whose input the group does not divide in float
    return f"int4-g{group_size}" if group_size else "int4-row"


def artifact_bytes(shape: ModelShape, group_size: int | None, int8: set[str], embedding: str, artifact: str) -> int:
    """Predicted file size of the plan in ``artifact``."""
    total = sum(
        tensor_bytes(_linear_format(lin, group_size, lin.name in int8), lin.rows, lin.cols, artifact)
        for lin in shape.linears
    )
    vocab, hidden = shape.embedding
    total += tensor_bytes("emb-" + embedding, vocab, hidden, artifact) + shape.float_params * 4
    if artifact == "pte":
        return total + PTE_OVERHEAD + PTE_OVERHEAD_PER_LAYER * int(shape.config["layers"])
    n_tensors = len(shape.linears) + 1 + shape.float_tensors
    return total + n_tensors * GGUF_TENSOR_OVERHEAD + GGUF_FIXED + shape.vocab_bytes


def _kv_bytes(shape: ModelShape, context: int, kv: str, artifact: str) -> int:
    from edgeft.devices.profiles import kv_cache_bytes

    per = KV_FORMATS[kv][0]
    assert per is not None
    elem = per[ARTIFACTS.index(artifact)]
    if kv == "int8" and artifact == "pte":
        elem += 5 / int(shape.config["head_dim"])  # fp32 scale + int8 zero point per (position, head)
    return kv_cache_bytes(shape.config, context, elem)


def size_limit(shape: ModelShape, budget: Budget, kv: str, artifact: str) -> tuple[float, str]:
    """The largest file (bytes) of ``artifact`` the budget allows, and which limit binds."""
    from edgeft.devices.profiles import RUNTIME_OVERHEAD_BYTES, get_profile

    limits = [(math.inf, "no limit")]
    if budget.max_size_mb is not None:
        limits.append((budget.max_size_mb * MB, f"--max-size {budget.max_size_mb:g} MB"))
    if budget.device is not None:
        p = get_profile(budget.device)
        kvb = _kv_bytes(shape, budget.context, kv, artifact)
        activations = 4 * (shape.config["vocab"] + 8 * shape.config["hidden"]) * 2  # as profiles.estimate
        limits.append(
            (
                p.app_memory_gib * 2**30 - kvb - activations - RUNTIME_OVERHEAD_BYTES,
                f"{p.name}'s {p.app_memory_gib:g} GiB app memory at {budget.context} tokens",
            )
        )
        if budget.min_decode is not None:
            fixed = shape.config["layers"] * p.layer_overhead_ms / 1e3
            per_token = (1 / budget.min_decode - fixed) * p.bandwidth_gbs * 1e9 * p.efficiency[0]
            limits.append((per_token - kvb / 2, f"--min-decode {budget.min_decode:g} tokens/s on {p.name}"))
    return min(limits, key=lambda x: x[0])


def predict(shape: ModelShape, budget: Budget, size: int, kv: str, artifact: str) -> dict[str, Any]:
    """What ``devices check`` will say of a file of ``size`` bytes (memory and decode need ``budget.device``)."""
    out: dict[str, Any] = {"bytes": size, "mb": round(size / MB, 3)}
    if budget.device is not None:
        from edgeft.devices.profiles import estimate, get_profile

        e = estimate(get_profile(budget.device), size, _kv_bytes(shape, budget.context, kv, artifact), shape.config)
        out.update(runtime_memory_mb=round(e["memory"] / MB, 1), decode_tokens_per_s=e["decode_tokens_per_s"])
    return out


@dataclass
class FitPlan:
    """A chosen plan: the QAT it trains, what it predicts, and every tensor's format with the reason."""

    budget: Budget
    group_size: int | None
    int8_modules: tuple[str, ...]
    embedding: str
    kv_cache: str
    predicted: dict[str, Any]
    tensors: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    why: str
    base: str = BASE_PRESET
    weight_scale: str = "absmax"
    calibration: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def qat_plan(self) -> Any:
        """The ``QATPlan`` that trains, converts and exports exactly this plan."""
        from .schemes import AUTO, AUTO_BASE, resolve

        if self.base != AUTO_BASE:
            raise EdgeftError(f"device-fit plans are built on {AUTO_BASE}, not {self.base!r}")
        return resolve(
            AUTO, self.group_size, self.weight_scale, self.int8_modules, embedding=EMBEDDING_FORMATS[self.embedding][0]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["int8_modules"] = list(self.int8_modules)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "FitPlan":
        try:
            d = dict(d)
            d["budget"] = Budget(**d["budget"])
            d["int8_modules"] = tuple(d["int8_modules"])
            if d.get("version") != 1:
                raise EdgeftError(f"qat plan version {d.get('version')!r} is not supported (1)")
            return FitPlan(**d)
        except (KeyError, TypeError) as e:
            raise EdgeftError(f"not a device-fit plan ({e})") from None

    def write(self, run: str | Path) -> Path:
        """Write ``run/qat_plan.json`` atomically."""
        from edgeft.fsutil import write_json
        from edgeft.rundir import RunDir

        path = RunDir(run).qat_plan
        write_json(path, self.to_dict())
        return path

    def summary(self) -> list[str]:
        """Lines for the CLI: the budget, the choice, the predictions, then one line per tensor."""
        b = self.budget
        parts = [
            f"device {b.device}" if b.device else None,
            f"max size {b.max_size_mb:g} MB" if b.max_size_mb else None,
            f"min decode {b.min_decode:g} tokens/s" if b.min_decode else None,
            f"context {b.context}",
            f"for the {b.artifact}" if b.artifact != "both" else None,
        ]
        n8 = len(self.int8_modules)
        lines = [
            f"device-fit plan ({', '.join(p for p in parts if p)}): {self.base} grids, int4 g{self.group_size} "
            f"linears with {n8} at int8, {self.embedding} embeddings, {self.kv_cache} KV cache",
            f"why: {self.why}",
        ]
        for art in ARTIFACTS:
            p = self.predicted.get(art, {})
            extra = ""
            if "runtime_memory_mb" in p:
                lo, hi = p["decode_tokens_per_s"]
                extra = f", runtime memory ~{p['runtime_memory_mb']:.0f} MB, decode {lo:.0f}-{hi:.0f} tokens/s"
            lines.append(f"predicted {art}: {p.get('mb', 0):.2f} MB{extra}")
        for t in self.tensors:
            lines.append(f"  {t['name']:48s} {t['format']:9s} {t['why']}")
        return lines


def load(run: str | Path) -> FitPlan | None:
    """The run's device-fit plan (``qat_plan.json``), or None when the run has none."""
    from edgeft.rundir import RunDir

    path = RunDir(run).qat_plan
    if not path.is_file():
        return None
    try:
        return FitPlan.from_dict(json.loads(path.read_text()))
    except ValueError as e:
        raise EdgeftError(f"{path}: not valid JSON ({e})") from None


def _candidate(
    shape: ModelShape,
    sens: dict[str, float],
    budget: Budget,
    gs: int | None,
    emb: str,
    kv: str,
) -> dict[str, Any]:
    """All-int4 at ``gs``, then the greedy int8 upgrades; fits or not, with the numbers."""
    tg = budget.targets
    limits = {a: size_limit(shape, budget, kv, a) for a in ARTIFACTS}
    sizes = {a: artifact_bytes(shape, gs, set(), emb, a) for a in ARTIFACTS}
    cand: dict[str, Any] = {
        "group_size": gs,
        "embedding": emb,
        "kv_cache": kv,
        "smallest_mb": {a: round(sizes[a] / MB, 3) for a in ARTIFACTS},
        "limit_mb": {a: round(limits[a][0] / MB, 3) for a in ARTIFACTS},
        "binding": {a: limits[a][1] for a in ARTIFACTS},
    }
    if any(sizes[a] > limits[a][0] for a in tg):
        cand.update(fits=False, loss_rise=None, int8=[])
        return cand

    def cost(lin: Linear) -> dict[str, int]:
        f4 = _linear_format(lin, gs, False)
        return {
            a: tensor_bytes("int8", lin.rows, lin.cols, a) - tensor_bytes(f4, lin.rows, lin.cols, a) for a in ARTIFACTS
        }

    slack0 = {a: limits[a][0] - sizes[a] for a in ARTIFACTS}
    quantized = [lin for lin in shape.linears if _linear_format(lin, gs, False) != "float"]
    costs = {lin.name: cost(lin) for lin in quantized}

    def per_byte(lin: Linear) -> float:  # loss rise per share of the tighter artifact's room
        c = max(costs[lin.name][a] / max(slack0[a], 1.0) for a in tg)
        return sens.get(lin.name, 0.0) / max(c, 1e-30)

    order = sorted((lin for lin in quantized if sens.get(lin.name, 0.0) > 0), key=per_byte, reverse=True)
    int8, skipped = [], {}
    for lin in order:
        c = costs[lin.name]
        if all(sizes[a] + c[a] <= limits[a][0] for a in tg):
            for a in ARTIFACTS:
                sizes[a] += c[a]
            int8.append(lin.name)
        else:
            skipped[lin.name] = {a: (c[a], limits[a][0] - sizes[a]) for a in tg}
    rise = sum(sens.get(lin.name, 0.0) for lin in quantized if lin.name not in int8)
    cand.update(
        fits=True,
        loss_rise=rise,
        int8=int8,
        order=[lin.name for lin in order],
        skipped=skipped,
        sizes=sizes,
        mb={a: round(sizes[a] / MB, 3) for a in ARTIFACTS},
    )
    return cand


def choose(
    shape: ModelShape,
    sensitivity: dict[Any, dict[str, float]],
    budget: Budget,
    group_sizes: tuple[int | None, ...] | None = None,
    weight_scale: str = "absmax",
    calibration: dict[str, Any] | None = None,
    embedding_sensitivity: dict[str, float] | None = None,
) -> FitPlan:
    """The most accurate plan that fits ``budget`` (module docstring). ``sensitivity``: per group size, each
    linear's loss rise at int4 (``calibrate``); ``group_sizes`` defaults to those it holds.
    ``embedding_sensitivity``: the loss rise of each embedding format (``calibrate``'s ``embedding``); a candidate's
    rise then counts its embedding's, and a measured format is no longer taken only when needed."""
    budget.check()
    group_sizes = tuple(group_sizes or sensitivity)
    missing = [g for g in group_sizes if g not in sensitivity]
    if missing:
        raise EdgeftError(f"no sensitivities measured for group size {missing[0]}")
    embs = [e for e, (cfg, _) in EMBEDDING_FORMATS.items() if cfg is not None]
    kvs = [k for k, (per, _) in KV_FORMATS.items() if per is not None]
    cands = [_candidate(shape, sensitivity[g], budget, g, e, k) for g in group_sizes for e in embs for k in kvs]
    emb_sens = embedding_sensitivity or {}
    for c in cands:
        if c["fits"] and c["embedding"] in emb_sens:
            c["embedding_rise"] = emb_sens[c["embedding"]]
            c["loss_rise"] += c["embedding_rise"]
    unmeasured = {k: v for k, v in UNMEASURED.items() if not (k == "embedding" and v in emb_sens)}
    fitting = [c for c in cands if c["fits"]]
    measured = [c for c in fitting if not any(c[k] == v for k, v in unmeasured.items())]
    fitting = measured or fitting
    if not fitting:
        small = min(cands, key=lambda c: max(c["smallest_mb"][a] - c["limit_mb"][a] for a in budget.targets))
        art = max(budget.targets, key=lambda a: small["smallest_mb"][a] - small["limit_mb"][a])
        raise EdgeftError(
            f"no plan fits the budget: the smallest, int4 g{small['group_size']} linears with {small['embedding']} "
            f"embeddings and an {small['kv_cache']} KV cache, is {small['smallest_mb']['pte']:.1f} MB as .pte and "
            f"{small['smallest_mb']['gguf']:.1f} MB as GGUF, over the {small['limit_mb'][art]:.1f} MB {art} "
            f"limit set by {small['binding'][art]}"
        )
    # the finest group size that fits first, then the least predicted rise: the calibration's rises are PTQ's, and
    # learned-scale QAT recovers fine groups more than they say (SmolLM2: two g64 plans predicted 0.16 below uniform
    # g32 trained to a higher perplexity; docs/device-fit.md)
    finest = min(_coarseness(c["group_size"]) for c in fitting)
    best = min(
        (c for c in fitting if _coarseness(c["group_size"]) == finest),
        key=lambda c: (c["loss_rise"], c["sizes"]["pte"]),
    )
    gs, sens = best["group_size"], sensitivity[best["group_size"]]
    rank = {n: i + 1 for i, n in enumerate(best["order"])}
    int8 = set(best["int8"])
    tensors = []
    for lin in shape.linears:
        fmt = _linear_format(lin, gs, lin.name in int8)
        s = sens.get(lin.name)
        b = {a: tensor_bytes(fmt, lin.rows, lin.cols, a) for a in ARTIFACTS}
        if fmt == "float":
            why = f"its input ({lin.cols}) is not a multiple of the group size {gs}: convert keeps it in float"
        elif fmt == "int8":
            more = b["pte"] - tensor_bytes(_linear_format(lin, gs, False), lin.rows, lin.cols, "pte")
            why = (
                f"int4 raises the loss {s:.3g} (rank {rank[lin.name]} of {len(rank)} by rise per byte); int8 "
                f"adds {more / MB:.3f} MB (.pte) and still fits"
            )
        elif s is None or s <= 0:
            why = f"int4 does not raise the loss here ({0.0 if s is None else s:.2g}): no bytes spent on it"
        else:
            skip = best["skipped"][lin.name]
            art = next(a for a in skip if skip[a][0] > skip[a][1])
            need, left = skip[art]
            why = (
                f"int4 raises the loss {s:.3g} (rank {rank[lin.name]}); its int8 upgrade (+{need / MB:.3f} MB) "
                f"did not fit the room left in the {art} ({max(left, 0) / MB:.3f} MB)"
            )
        tensors.append(
            {"name": lin.name, "shape": [lin.rows, lin.cols], "format": fmt, "loss_rise": s, "bytes": b, "why": why}
        )
    vocab, hidden = shape.embedding
    alt = "; ".join(f"{e}: {r}" for e, (c, r) in EMBEDDING_FORMATS.items() if c is None)
    needed = (
        "no plan with int8 embeddings and an fp32 KV cache fits; its accuracy cost is not measured by the "
        "calibration, so it is taken only when needed"
    )
    what = {
        "int8": "int8 per row (.pte embedding_byte, GGUF Q8_0)",
        "int4": "int4 in groups of 32 (.pte embedding_4bit, GGUF Q4_0)",
    }[best["embedding"]]
    if best["embedding"] in emb_sens:  # measured: the plan's total rise decided it
        rises = ", ".join(f"{e} {r:.3g}" for e, r in emb_sens.items())
        emb_why = f"{what}: its loss rise ({rises}) is counted in the plan's, which is the least that fits"
    elif best["embedding"] == "int8":
        emb_why = f"{what}: int4 groups are taken only when needed"
    else:
        emb_why = f"{what}: {needed}"
    tensors.append(
        {
            "name": "embedding",
            "shape": [vocab, hidden],
            "format": best["embedding"],
            "loss_rise": emb_sens.get(best["embedding"]),
            "bytes": {a: tensor_bytes("emb-" + best["embedding"], vocab, hidden, a) for a in ARTIFACTS},
            "why": emb_why + (f" ({alt})" if alt else ""),
        }
    )
    kv_alt = "; ".join(f"{k}: {r}" for k, (p, r) in KV_FORMATS.items() if p is None)
    tensors.append(
        {
            "name": "kv_cache",
            "shape": [budget.context],
            "format": best["kv_cache"],
            "why": (
                "fp32 in the .pte, f16 in llama.cpp: int8 is taken only when needed"
                if best["kv_cache"] == "fp32"
                else f"int8 in the .pte (ExecuTorch's quantized KV cache), "
                f"f16 in llama.cpp (a runtime option, not in the file): {needed}"
            )
            + (f" ({kv_alt})" if kv_alt else ""),
        }
    )
    sizes = best["sizes"]
    predicted = {a: predict(shape, budget, sizes[a], best["kv_cache"], a) for a in ARTIFACTS}
    predicted["loss_rise"] = best["loss_rise"]
    others = [c for c in cands if c is not best]

    def label(c: dict[str, Any]) -> str:  # group size alone repeats: the embedding and KV formats tell them apart
        return f"g{c['group_size']} {c['embedding']} embeddings {c['kv_cache']} KV"

    def verdict(c: dict[str, Any]) -> str:
        if not c["fits"]:
            return (
                "does not fit ("
                + ", ".join(f"{c['smallest_mb'][a]:.2f} MB {a}" for a in budget.targets)
                + " at its smallest)"
            )
        which = [f"{v} {k.replace('_', ' ')}" for k, v in unmeasured.items() if c[k] == v]
        if c not in fitting:  # fits, but on a format whose loss the calibration does not measure
            what = " and ".join(which)
            return f"fits at {c['loss_rise']:.4g} not counting its {what} (unmeasured: taken only when needed)"
        if _coarseness(c["group_size"]) > finest:
            return f"fits at {c['loss_rise']:.4g}, set aside: g{best['group_size']} fits, and finer groups come first"
        return f"{c['loss_rise']:.4g}"

    why = (
        f"{label(best)} with {len(int8)} of {len(rank) or 0} loss-raising linears at int8 predicts a loss rise of "
        f"{best['loss_rise']:.4g}, the least of the fitting candidates at the finest group size that fits "
        "(QAT recovers finer groups more than the calibration's PTQ rises say)"
        + "".join(f"; {label(c)}: {verdict(c)}" for c in others)
        + "; binding limit: "
        + ", ".join(f"{best['binding'][a]} ({a})" for a in budget.targets)
    )
    slim = [{k: v for k, v in c.items() if k not in ("order", "skipped", "sizes")} for c in cands]
    return FitPlan(
        budget=budget,
        group_size=gs,
        int8_modules=tuple(n for n in (lin.name for lin in shape.linears) if n in int8),
        embedding=best["embedding"],
        kv_cache=best["kv_cache"],
        predicted=predicted,
        tensors=tensors,
        candidates=slim,
        why=why,
        weight_scale=weight_scale,
        calibration=calibration or {},
    )


def _coarseness(group_size: int | None) -> float:
    """Orders group sizes finest first (None: one group per row, the coarsest)."""
    return float("inf") if group_size is None else float(group_size)


def check_feasible(shape: ModelShape, budget: Budget, group_sizes: tuple[int | None, ...] | None = None) -> None:
    """Fail before any training when not even the smallest plan fits (sizes do not depend on the calibration)."""
    from .schemes import resolve

    scheme = resolve(BASE_PRESET).scheme
    sizes = group_sizes or tuple(dict.fromkeys((scheme.group_size, *scheme.group_sizes)))
    choose(shape, {g: {} for g in sizes}, budget)


def calibration_batches(
    examples: list[dict[str, Any]], pad_id: int, n: int = 32, batch_size: int = 8, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Padded batches of the first ``n`` training examples (the data's own order after the run's seeded shuffle)."""
    from edgeft.data.batching import collate

    if not examples:
        raise EdgeftError("calibration needs training examples")
    chosen = examples[:n]
    out = []
    for i in range(0, len(chosen), batch_size):
        b = collate(chosen[i : i + batch_size], pad_id)
        out.append({k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels", "attention_mask")})
    return out


# bump when linear_sensitivity's method or calibrate's result changes: entries cached by the old code then miss
CALIBRATION_VERSION = 1


def _hash_tensor(h: Any, name: str, t: Any) -> None:
    import torch

    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes as stored: bf16 (which numpy lacks) included


def calibration_key(
    model: Any, batches: list[dict[str, Any]], weight_scale: str, group_sizes: tuple[int | None, ...]
) -> str:
    """The sha256 digest that names a calibration's result in the cache (:func:`calibrate`).

    In the key: every parameter and buffer of ``model`` by name (tied ones under each name), with its dtype, shape
    and bytes (non-persistent buffers such as RoPE's ``inv_freq`` too); the model's class, its config without
    ``_name_or_path`` and ``transformers_version`` (the same weights from another directory hit) and its attention
    implementation; the device kind it runs on (``cpu``/``cuda``: a different rounding); every batch's tensors by
    key (input ids, labels, attention mask, whatever the dicts hold) with dtype, shape and bytes, in order;
    ``weight_scale``, the group sizes, the base preset's full scheme and plan; :data:`CALIBRATION_VERSION`.

    Not in the key: the versions of torch, transformers and torchao (a new release may round the losses
    differently: an entry keeps the old rounding until the cache is cleared or the version bumped), the device's
    model (two GPUs of one kind share entries), the thread count, the budget (the choice, :func:`choose`, is made
    afresh from the cached sensitivities every run) and where the model was loaded from.
    """
    from .schemes import resolve

    base = resolve(BASE_PRESET, weight_scale=weight_scale)
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    first = next(iter(model.parameters()), None)
    meta = {
        "version": CALIBRATION_VERSION,
        "class": type(model).__name__,
        "config": cfg,
        "attn": getattr(model.config, "_attn_implementation", None),
        "device": first.device.type if first is not None else None,
        "scheme": asdict(base.scheme),
        "plan": base.to_dict(),
        "weight_scale": weight_scale,
        "group_sizes": list(group_sizes),
    }
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, t in model.named_parameters(remove_duplicate=False):
        _hash_tensor(h, "param:" + name, t)
    for name, t in model.named_buffers(remove_duplicate=False):
        _hash_tensor(h, "buffer:" + name, t)
    h.update(f"batches:{len(batches)}\n".encode())
    for i, b in enumerate(batches):
        for k in sorted(b):
            v = b[k]
            if hasattr(v, "detach"):
                _hash_tensor(h, f"batch{i}:{k}", v)
            else:
                h.update(f"batch{i}:{k}={json.dumps(v, sort_keys=True, default=str)}\n".encode())
    return h.hexdigest()


def _cache_path(digest: str) -> Path:
    from edgeft.fsutil import cache_dir

    return cache_dir() / "calibration" / f"{digest}.json"


def _cache_read(path: Path, digest: str, sizes: tuple[int | None, ...]) -> dict[str, Any] | None:
    """The cached result, or None when absent or unusable (a corrupt entry is recomputed, never an error)."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        if d["digest"] != digest or d["version"] != CALIBRATION_VERSION:
            raise ValueError("digest or version differs")
        r = d["result"]
        sens = {g: {str(n): float(x) for n, x in rises.items()} for g, rises in r["sensitivity"]}
        if list(sens) != list(sizes) or list(r["group_sizes"]) != list(sizes):
            raise ValueError("group sizes differ")
        out = {
            "float_loss": float(r["float_loss"]),
            "tokens": int(r["tokens"]),
            "sensitivity": sens,
            "seconds": float(r["seconds"]),
            "group_sizes": list(sizes),
        }
        if "embedding" in r:  # entries written before embeddings were measured lack it (calibrate adds it)
            out["embedding"] = {str(k): float(v) for k, v in r["embedding"].items()}
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("calibration cache entry %s is unusable (%s): calibrating again", path, e)
        return None


def _cache_write(path: Path, digest: str, r: dict[str, Any]) -> None:
    from edgeft.fsutil import remove_stale, write_json

    result = {k: v for k, v in r.items() if k != "sensitivity"}
    result["sensitivity"] = [[g, rises] for g, rises in r["sensitivity"].items()]  # keeps int (or None) sizes
    try:
        remove_stale(path.parent)  # a killed writer's temporary files
        write_json(path, {"version": CALIBRATION_VERSION, "digest": digest, "result": result})
    except OSError as e:  # a read-only or full cache costs the next run the calibration, not this run its plan
        log.warning("could not cache the calibration in %s (%s)", path, e)


def calibrate(
    model: Any, batches: list[dict[str, Any]], weight_scale: str = "absmax", group_sizes: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Per-linear int4 sensitivity of ``model`` (float, left unchanged but for an untied head) on ``batches``, for
    every candidate group size of the base preset's scheme (``sensitivity.linear_sensitivity``).

    The result is cached under ``edgeft.fsutil.cache_dir()/calibration/<digest>.json`` (:func:`calibration_key`
    says what the digest covers), so a second plan of one fine-tune (another device or budget) reuses it:
    ``cache`` says ``computed`` or ``reused``, ``digest`` names the entry and ``seconds`` stays the computation's.
    """
    from .schemes import resolve
    from .sensitivity import linear_sensitivity, untie_head

    base = resolve(BASE_PRESET, weight_scale=weight_scale)
    sizes = group_sizes or tuple(dict.fromkeys((base.scheme.group_size, *base.scheme.group_sizes)))
    digest = calibration_key(model, batches, weight_scale, sizes)
    path = _cache_path(digest)
    untie_head(model)  # convert unties a head whose embedding is quantized; measure the head on its own weight
    r = _cache_read(path, digest, sizes)
    if r is not None:
        log.info("calibration reused from %s (computed in %.0f s)", path, r["seconds"])
        if "embedding" not in r:  # an entry from before embeddings were measured: one forward per format
            r["embedding"] = _embedding_rises(model, batches, base, r["float_loss"])
            _cache_write(path, digest, r)
        return {**r, "cache": "reused", "digest": digest}
    t0 = time.perf_counter()
    r = linear_sensitivity(model, batches, base, sizes)
    r["embedding"] = _embedding_rises(model, batches, base, r["float_loss"])
    r["seconds"] = round(time.perf_counter() - t0, 1)
    r["group_sizes"] = list(sizes)
    _cache_write(path, digest, r)
    return {**r, "cache": "computed", "digest": digest}


def _embedding_rises(model: Any, batches: list[dict[str, Any]], base: Any, float_loss: float) -> dict[str, float]:
    """The loss rise of each available embedding format (:data:`EMBEDDING_FORMATS`), for :func:`choose`."""
    from .sensitivity import embedding_sensitivity

    formats = {e: t for e, (t, _) in EMBEDDING_FORMATS.items() if t is not None}
    return embedding_sensitivity(model, batches, base, formats, float_loss)


def plan_for_model(
    model: Any,
    batches: list[dict[str, Any]],
    budget: Budget,
    tokenizer_dir: str | Path | None,
    weight_scale: str = "absmax",
    group_size: int | None = None,
) -> FitPlan:
    """Calibrate ``model`` on ``batches`` and choose the plan for ``budget`` (``group_size``: fixed, else chosen)."""
    budget.check()
    shape = model_shape(model, tokenizer_dir)
    cal = calibrate(model, batches, weight_scale, (group_size,) if group_size else None)
    sens = cal.pop("sensitivity")
    info = {
        **cal,
        "examples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "sensitivity": {str(g): v for g, v in sens.items()},
    }
    return choose(
        shape, sens, budget, weight_scale=weight_scale, calibration=info, embedding_sensitivity=cal["embedding"]
    )
