"""The run directory's layout: the one place that names its files and folders (the contract between stages).

```
runs/<name>/                 RunDir
  config.yaml, data.json     the resolved config, a hash of its examples   metrics.jsonl, loss.png   the loss log
  qat_plan.json              --qat auto: the device-fit plan (each tensor's format and why)
  twin_generations.json      --qat-corpus-source generations/mixed: the twin's generations the QAT run mixes in
  model/                     trained adapter or full weights, edgeft.json (what was trained), qat_scales.safetensors
  converted/                 what the phone runs (torchao tensors, or float) and scheme.json (its quantization record)
  merged/                    a LoRA run's float model merged once for the exporters (made on demand)
  exports/                   Exports: model.pte, model-last.pte, model-<quant>.gguf, Modelfile, torchao/, manifest.json
  checkpoints/step-N/        resumable training state (train/checkpoint.py owns what is inside)
  eval/                      report.json, report.md, metrics.png, questions.jsonl
  baseline/                  Variant: the no-QAT twin: model/, converted/ (= PTQ), exports/, checkpoints/, metrics.jsonl
```

Guarantees: paths only (nothing here reads a model or writes a file but the export manifest); a directory counts as
a run when it holds ``config.yaml``, a variant as trained when ``model/edgeft.json`` exists (written last, atomically
with ``model/``) and as done when ``converted/scheme.json`` exists too. This module imports nothing of edgeft but
``errors`` and ``fsutil``, so every stage may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import EdgeftError
from .fsutil import write_json

RUNS_DIR = Path("runs")  # where runs go without --out, and where find() looks for the newest
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"  # a hash of the examples the run trains on (--resume refuses other data)
MODEL_INFO_FILE = "edgeft.json"  # in model/: what was trained (base model, mode, QAT plan, training summary)
SCALES_FILE = "qat_scales.safetensors"  # in model/: learned QAT group scales (qat.learned_scales), by linear name
SCHEME_FILE = "scheme.json"  # in a converted model directory: its quantization record (qat.convert)
MANIFEST_FILE = "manifest.json"  # in exports/: one record per export, by name
MODELFILE = "Modelfile"
GENERATIONS_FILE = "twin_generations.json"  # at a run's root: the twin's generations the QAT run trains on
PLAN_FILE = "qat_plan.json"  # at a run's root: the device-fit plan of --qat auto (qat/plan.py)
CHECKPOINT_STATE = "state.json"  # written last into checkpoints/<step>/: the checkpoint is complete
QUESTIONS_FILE = "questions.jsonl"  # in eval/: each question's result per variant and runtime
# the .pte by its logits: every position (evaluation, the default) or the last one only (deployment), each under its
# own name so that `edgeft eval`, which needs every position and reuses model.pte, never meets a last-token program
PTE_FILES = {"all": "model.pte", "last": "model-last.pte"}


def gguf_file(quant: str) -> str:
    """The GGUF's file name at ``quant`` (``model-q4_0.gguf``)."""
    return f"model-{quant}.gguf"


def is_converted(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` is a converted model directory (qat.convert wrote its ``scheme.json``)."""
    return (Path(model_dir) / SCHEME_FILE).exists()


def scheme_path(model_dir: str | os.PathLike) -> Path:
    """The quantization record of the converted model directory ``model_dir``."""
    return Path(model_dir) / SCHEME_FILE


def read_scheme(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The quantization record of a converted model directory, None when ``model_dir`` is not one."""
    path = scheme_path(model_dir)
    return json.loads(path.read_text()) if path.exists() else None


def run_name(model_dir: str | os.PathLike) -> str:
    """A model directory's name for humans: a run's ``model/`` or ``converted/`` is named after its run."""
    p = Path(model_dir)
    return p.parent.name if p.name in ("converted", "model") else p.name


class Exports:
    """A directory of exported artifacts (a run's ``exports/``, its baseline's, or the evaluator's float one)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Exports({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Exports) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def pte(self, logits: str = "all") -> Path:
        """The ``.pte`` with every position's logits (``"all"``) or the last one's (``"last"``)."""
        return self.path / PTE_FILES[logits]

    def gguf(self, quant: str) -> Path:
        return self.path / gguf_file(quant)

    @property
    def modelfile(self) -> Path:
        return self.path / MODELFILE

    @property
    def torchao(self) -> Path:
        return self.path / "torchao"

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def float(self) -> Exports:
        """Where the evaluator exports the baseline's float model (the BF16 variant) for the runtimes."""
        return Exports(self.path / "float")

    def newest_gguf(self) -> Path | None:
        """The most recently written GGUF here, None when there is none."""
        ggufs = sorted(self.path.glob("*.gguf"), key=lambda p: p.stat().st_mtime)
        return ggufs[-1] if ggufs else None

    def artifact(self) -> Path | None:
        """What a device check looks at by default: ``model.pte``, else the newest GGUF, else None."""
        return self.pte() if self.pte().exists() else self.newest_gguf()

    def read_manifest(self) -> dict[str, Any]:
        """The export records by name (empty when nothing was exported here)."""
        return json.loads(self.manifest.read_text()) if self.manifest.exists() else {}

    def record(self, name: str, report: dict[str, Any]) -> None:
        """Add (or replace) one export's record in ``manifest.json``, atomically."""
        data = self.read_manifest()
        data[name] = report
        write_json(self.manifest, data)


class Variant:
    """One trained model of a run: the run itself (QAT, or plain fine-tuning) or its ``baseline/`` twin."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Variant) and type(other) is type(self) and other.root == self.root

    def __hash__(self) -> int:
        return hash((type(self), self.root))

    # --- layout
    @property
    def model(self) -> Path:
        """The trained model: a PEFT adapter or the full weights, with the tokenizer."""
        return self.root / "model"

    @property
    def model_info(self) -> Path:
        return self.model / MODEL_INFO_FILE

    @property
    def scales(self) -> Path:
        """The learned QAT scales saved with the trained model (absent when it has none)."""
        return self.model / SCALES_FILE

    @property
    def converted(self) -> Path:
        return self.root / "converted"

    @property
    def scheme(self) -> Path:
        return scheme_path(self.converted)

    @property
    def merged(self) -> Path:
        """A LoRA variant's adapter merged into its base, as an HF directory (models.float_dir writes it)."""
        return self.root / "merged"

    @property
    def exports(self) -> Exports:
        return Exports(self.root / "exports")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON line per logged training step."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        """The W&B run id, kept so that a resumed run logs into the same W&B run."""
        return self.root / "wandb-id.txt"

    # --- questions
    def has_trained_model(self) -> bool:
        return self.model_info.exists()

    def has_progress(self) -> bool:
        """Whether this variant holds anything a failed start does not: a logged step, a complete checkpoint or a
        trained model."""
        return (
            (self.metrics.is_file() and self.metrics.stat().st_size > 0)
            or self.has_trained_model()
            or any(self.checkpoints.glob(f"*/{CHECKPOINT_STATE}"))
        )

    def has_converted(self) -> bool:
        return self.scheme.exists()

    def done(self) -> bool:
        """Trained and converted: a resumed run skips this variant."""
        return self.has_trained_model() and self.has_converted()

    def info(self) -> dict[str, Any]:
        """``model/edgeft.json``: what was trained; one clear error when the variant has no trained model."""
        if not self.has_trained_model():
            raise EdgeftError(f"{self.root} has no trained model (model/{MODEL_INFO_FILE})")
        return json.loads(self.model_info.read_text())

    def scheme_record(self) -> dict[str, Any] | None:
        """``converted/scheme.json``, None when the variant is not converted."""
        return read_scheme(self.converted)


class RunDir(Variant):
    """A run directory: the QAT (or only) variant at its root, plus the config, the plots, the evaluation and the
    no-QAT twin in ``baseline/``."""

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def qat_plan(self) -> Path:
        """``--qat auto``: the device-fit plan the run chose (qat/plan.py)."""
        return self.root / PLAN_FILE

    @property
    def generations(self) -> Path:
        """``--qat-corpus-source generations/mixed``: the trained twin's generations the QAT run mixes in (made once
        after the twin trains; a resumed run reads them)."""
        return self.root / GENERATIONS_FILE

    @property
    def data_file(self) -> Path:
        """A hash of the examples the run trains on (written at the start; ``--resume`` refuses other data)."""
        return self.root / DATA_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_report(self) -> Path:
        return self.eval / "report.json"

    @property
    def eval_markdown(self) -> Path:
        return self.eval / "report.md"

    @property
    def eval_plot(self) -> Path:
        return self.eval / "metrics.png"

    @property
    def eval_questions(self) -> Path:
        """Each question's result per variant and runtime (devices/evaluate.py)."""
        return self.eval / QUESTIONS_FILE

    @property
    def baseline(self) -> Variant:
        return Variant(self.root / "baseline")

    def is_run(self) -> bool:
        return self.config_file.exists()

    def variants(self) -> list[Variant]:
        """The run's variants, the run itself first."""
        return [Variant(self.root), self.baseline]

    @classmethod
    def find(cls, run: str | os.PathLike | None = None) -> RunDir:
        """The given run directory, or the newest one under ./runs; one clear error if there is none."""
        if run is None:
            candidates = [p for p in RUNS_DIR.glob("*") if cls(p).is_run()] if RUNS_DIR.is_dir() else []
            if not candidates:
                raise EdgeftError(f"no run found under ./{RUNS_DIR}; pass --run DIR or train first")
            return cls(max(candidates, key=lambda p: p.stat().st_mtime))
        found = cls(run)
        if not found.is_run():
            raise EdgeftError(f"{found.root} is not an edgeft run directory (no {CONFIG_FILE})")
        return found

    @classmethod
    def of_artifact(cls, artifact: str | os.PathLike) -> RunDir | None:
        """The run an exported artifact belongs to (one in a run's ``exports/``), None for a file elsewhere."""
        p = Path(artifact)
        return cls(p.parent.parent) if p.parent.name == "exports" else None

    @classmethod
    def adapter_of(cls, path: str | os.PathLike) -> Path | None:
        """The trained adapter's directory when ``path`` is a LoRA run (PEFT's adapter_config.json in model/)."""
        model = cls(path).model
        return model if (model / "adapter_config.json").exists() else None


def find_run(run: str | os.PathLike | None) -> Path:
    """The given run directory, or the newest one under ./runs, as a path (see :meth:`RunDir.find`)."""
    return RunDir.find(run).root
