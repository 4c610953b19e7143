"""RunDir: the layout DESIGN.md documents, spelled out here literally as the reference, and the questions asked
of it."""

import json
import os
from pathlib import Path

import pytest

from edgeft.errors import EdgeftError
from edgeft.rundir import Exports, RunDir, Variant, find_run, is_converted, read_scheme, run_name


def test_layout_is_the_documented_one(tmp_path):
    run = RunDir(tmp_path / "r")
    r = tmp_path / "r"
    assert (run.config_file, run.metrics, run.loss_plot) == (r / "config.yaml", r / "metrics.jsonl", r / "loss.png")
    assert (run.model, run.model_info, run.scales) == (
        r / "model",
        r / "model/edgeft.json",
        r / "model/qat_scales.safetensors",
    )
    assert (run.converted, run.scheme, run.merged) == (r / "converted", r / "converted/scheme.json", r / "merged")
    assert (run.checkpoints, run.eval, run.eval_report) == (r / "checkpoints", r / "eval", r / "eval/report.json")
    assert (run.eval_markdown, run.eval_plot, run.eval_questions) == (
        r / "eval/report.md",
        r / "eval/metrics.png",
        r / "eval/questions.jsonl",
    )
    ex = run.exports
    assert (ex.path, ex.pte(), ex.pte("last"), ex.gguf("q4_0")) == (
        r / "exports",
        r / "exports/model.pte",
        r / "exports/model-last.pte",
        r / "exports/model-q4_0.gguf",
    )
    assert (ex.modelfile, ex.torchao, ex.manifest, ex.float.path) == (
        r / "exports/Modelfile",
        r / "exports/torchao",
        r / "exports/manifest.json",
        r / "exports/float",
    )
    base = run.baseline
    assert type(base) is Variant and base.root == r / "baseline"
    assert (base.model, base.converted, base.exports.path, base.checkpoints, base.metrics) == (
        r / "baseline/model",
        r / "baseline/converted",
        r / "baseline/exports",
        r / "baseline/checkpoints",
        r / "baseline/metrics.jsonl",
    )
    assert not hasattr(base, "baseline") and not hasattr(base, "config_file")  # a twin has no twin, no config
    assert os.fspath(run) == str(r) and os.fspath(ex) == str(r / "exports")
    assert run.variants() == [Variant(r), base]


def test_questions_follow_the_files(tmp_path):
    run = RunDir(tmp_path)
    assert not (run.is_run() or run.has_trained_model() or run.has_converted() or run.done())
    (tmp_path / "config.yaml").write_text("model: tiny-llama\n")
    assert run.is_run()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "edgeft.json").write_text('{"mode": "lora"}')
    assert run.has_trained_model() and not run.done() and run.info() == {"mode": "lora"}
    (tmp_path / "converted").mkdir()
    assert not is_converted(tmp_path / "converted") and read_scheme(tmp_path / "converted") is None
    (tmp_path / "converted" / "scheme.json").write_text('{"plan": null}')
    assert run.done() and is_converted(run.converted) and run.scheme_record() == {"plan": None}
    assert not run.baseline.done()
    with pytest.raises(EdgeftError, match="has no trained model"):
        run.baseline.info()


def test_find_names_a_run_or_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgeftError, match=r"no run found under \./runs"):
        RunDir.find()
    for i, name in enumerate(["old", "new"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.yaml").write_text("{}\n")
        os.utime(tmp_path / "runs" / name, (1000 + i, 1000 + i))
    (tmp_path / "runs" / "not-a-run").mkdir()
    os.utime(tmp_path / "runs" / "not-a-run", (2000, 2000))
    assert RunDir.find() == RunDir("runs/new") and find_run(None) == Path("runs/new")
    assert RunDir.find(tmp_path / "runs" / "old").root == tmp_path / "runs" / "old"
    with pytest.raises(EdgeftError, match="not an edgeft run directory"):
        RunDir.find(tmp_path / "runs" / "not-a-run")


def test_artifacts_and_adapters_lead_back_to_their_run(tmp_path):
    assert RunDir.of_artifact(tmp_path / "r" / "exports" / "model.pte") == RunDir(tmp_path / "r")
    assert RunDir.of_artifact(tmp_path / "elsewhere" / "model.pte") is None
    assert run_name(tmp_path / "r" / "converted") == "r" and run_name(tmp_path / "r" / "model") == "r"
    assert run_name(tmp_path / "some-hf-dir") == "some-hf-dir"
    assert RunDir.adapter_of(tmp_path / "r") is None
    (tmp_path / "r" / "model").mkdir(parents=True)
    (tmp_path / "r" / "model" / "adapter_config.json").write_text("{}")
    assert RunDir.adapter_of(tmp_path / "r") == tmp_path / "r" / "model"


def test_exports_manifest_and_newest_gguf(tmp_path):
    ex = Exports(tmp_path)
    assert ex.read_manifest() == {} and ex.newest_gguf() is None and ex.artifact() is None
    ex.record("gguf", {"path": "a"})
    ex.record("pte", {"path": "b"})
    ex.record("gguf", {"path": "c"})  # replaced, the others kept
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"gguf": {"path": "c"}, "pte": {"path": "b"}}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    for i, q in enumerate(["q8_0", "q4_0"]):
        ex.gguf(q).write_bytes(b"GGUF")
        os.utime(ex.gguf(q), (1000 + i, 1000 + i))
    assert ex.newest_gguf() == tmp_path / "model-q4_0.gguf" and ex.artifact() == ex.newest_gguf()
    ex.pte().write_bytes(b"pte")
    assert ex.artifact() == tmp_path / "model.pte"
