"""ExecuTorch ``.pte`` export of the Llama 3.2, Mistral and Phi-4-mini shapes, against the eager model.

Tiny random models with the real configs' RoPE variants and shapes (family_models.py). Each export runs the
exporter's own validation (float programs within 1e-3 of eager); the tests also run the programs past the
positions and windows where each family differs from plain Llama, and show that the validation would see a
program that got the family wrong (the eager models with the wrong RoPE are far beyond the float bound).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("executorch")

from edgeft import qat  # noqa: E402
from edgeft.devices.executorch_runtime import PteRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model  # noqa: E402

from . import family_models as fm  # noqa: E402

MAX_SEQ = 64
WINDOW, WIN_SEQ, WIN_CTX = 16, 24, 96  # Mistral v0.1-style window on every layer; ring of 16 + 24 - 1 = 39 rows
MODELS = {
    "llama32": ("llama", fm.LLAMA32),
    "nemo-window": ("mistral", dict(fm.MISTRAL_NEMO, sliding_window=WINDOW)),
    "phi4mini": ("phi3", fm.PHI4_MINI),
}


@pytest.fixture(scope="module")
def sources() -> dict:
    return {name: fm.build(name, arch, cfg) for name, (arch, cfg) in MODELS.items()}


@pytest.fixture(scope="module")
def eager(sources) -> dict:
    return {name: load_model(src) for name, src in sources.items()}


@pytest.fixture(scope="module")
def exports(sources, eager, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pte-families")
    reports = {
        "llama32": pte.export(sources["llama32"], out / "llama32", max_seq_len=MAX_SEQ),
        "nemo-window": pte.export(sources["nemo-window"], out / "nemo", max_seq_len=WIN_SEQ, max_context_len=WIN_CTX),
        "phi4mini": pte.export(sources["phi4mini"], out / "phi4mini", max_seq_len=MAX_SEQ),
    }
    # QAT's format on the fused projections: int8-int4 with the fused qkv_proj at int8 (--qat-int8 qkv_proj)
    model, tok = eager["phi4mini"]
    converted, record = qat.convert(copy.deepcopy(model), qat.resolve("int8-int4", int8_modules=("qkv_proj",)))
    src = qat.save_converted(converted, tok, record, out / "phi4mini-qat-src")
    reports["phi4mini-qat"] = pte.export(src, out / "phi4mini-qat", max_seq_len=MAX_SEQ, dynamic_shape=False)
    return reports


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", ["llama32", "nemo-window", "phi4mini", "phi4mini-qat"])
def test_export_validates(exports, case):
    r = exports[case]
    v = r["validation"]
    assert v["rel_err"] <= v["tolerance"]["rel"] and v["top1"] >= v["tolerance"]["top1"] and v["runner_match"]
    if case == "phi4mini-qat":
        assert r["linears"] == {"dyn-act": 9}  # fused qkv, o, fused gate_up, down per layer, and the head
    else:
        assert v["rel_err"] <= pte.FLOAT_REL and v["greedy_agreement"] == 1.0


def _wrong_rope(model, **rope_parameters):
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = rope_parameters
    other = type(model)(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("case", ["llama32", "phi4mini"])
def test_validation_sees_the_rope_variant(eager, case):
    # on the exporter's own validation sequences, the model with its RoPE variant dropped is far outside the
    # float bound: a program that lost it could not pass
    model, tok = eager[case]
    seqs = pte._validation_sequences(tok, MAX_SEQ)
    theta = model.config.rope_parameters["rope_theta"]
    plain = _wrong_rope(
        model,
        rope_type="default",
        rope_theta=theta,
        partial_rotary_factor=model.config.rope_parameters.get("partial_rotary_factor", 1.0),
    )
    worst = max(_rel(EagerRuntime(plain).logits(s), EagerRuntime(model).logits(s)) for s in seqs)
    assert worst > 5 * pte.FLOAT_REL


def test_phi4mini_partial_rotary_program_matches_eager_token_by_token(exports, eager):
    model, tok = eager["phi4mini"]
    ids = pte._heldout_ids(tok)[:MAX_SEQ]
    want = EagerRuntime(model).logits(ids)
    with PteRuntime(exports["phi4mini"]["path"]) as rt:
        got = torch.cat([rt._step(ids[:5], 0)] + [rt._step([t], 5 + i) for i, t in enumerate(ids[5:])], 0)
    assert _rel(got, want) <= pte.FLOAT_REL and bool((got.argmax(-1) == want.argmax(-1)).all())


def test_mistral_window_ring_past_the_window(exports, eager):
    model, tok = eager["nemo-window"]
    kv = exports["nemo-window"]["kv_cache"]
    assert kv["ring_rows"] == WINDOW + WIN_SEQ - 1 and kv["ring_layers"] == kv["layers"] == 2  # every layer
    ids = pte._heldout_ids(tok)[:80]
    want = EagerRuntime(model).logits(ids)
    with PteRuntime(exports["nemo-window"]["path"]) as rt:
        got = rt.logits(ids)  # chunks of 24: the ring wraps at 39
        gen = rt.generate(ids[:17], 40, set())
    assert _rel(got, want) <= pte.FLOAT_REL
    assert gen == EagerRuntime(model).generate(ids[:17], 40, set())
    no_window = copy.deepcopy(model.config)
    no_window.sliding_window = None
    other = type(model)(no_window).eval()
    other.load_state_dict(model.state_dict())
    assert _rel(EagerRuntime(other).logits(ids), want) > 5 * pte.FLOAT_REL  # the window matters here


def test_longrope_beyond_the_original_context_is_refused(sources, tmp_path):
    with pytest.raises(EdgeftError, match="LongRoPE with max_context_len 8192 beyond the original context 4096") as e:
        pte.export(sources["phi4mini"], tmp_path / "out", max_seq_len=64, max_context_len=8192)
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "model.pte").exists()
