"""ExecuTorch .pte exporter and the ``pte`` runtime on the tiny models, against eager PyTorch.

Every export here runs the exporter's own validation (ExecuTorch runtime and TextLLMRunner against eager);
the tests check the artifacts independently through ``PteRuntime`` and ExecuTorch's runner, and that a
mismatching or corrupted artifact is refused without touching an earlier good file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from edgeft import qat  # noqa: E402
from edgeft.devices.executorch_runtime import PteRuntime  # noqa: E402
from edgeft.devices.runtimes import EagerRuntime, load_runtime  # noqa: E402
from edgeft.errors import EdgeftError  # noqa: E402
from edgeft.exporters import pte  # noqa: E402
from edgeft.models import load_model, resolve_model  # noqa: E402

MAX_SEQ = 128
TEXT = "The committee met on Tuesday to discuss the budget, 42 items in all, and adjourned at noon."
# (model, scheme, max_seq_len, max_context_len, dynamic_shape): the qwen3 float program takes prompts in
# chunks of 32; the qwen3 int8-int4 program is the one-token (static) variant
CASES = {
    "llama-float": ("tiny-llama", None, MAX_SEQ, None, True),
    "qwen3-float": ("tiny-qwen3", None, 32, MAX_SEQ, True),
    "llama-phone": ("tiny-llama", "phone-deployment", MAX_SEQ, None, True),
    "qwen3-int8-int4": ("tiny-qwen3", "int8-int4", MAX_SEQ, None, False),
    # searched scales, and the MLP's gate/up projections at int8 per channel (int8 activations x int8 weights)
    "llama-phone-mse-int8-mlp": (
        "tiny-llama",
        qat.resolve("phone-deployment", weight_scale="mse", int8_modules=("gate_proj", "up_proj")),
        MAX_SEQ,
        None,
        True,
    ),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source directories: the float HF dirs, and PTQ-converted dirs (same format as after QAT)."""
    out = tmp_path_factory.mktemp("pte-src")
    srcs = {}
    for case, (name, scheme, *_) in CASES.items():
        if scheme is None:
            srcs[case] = resolve_model(name)
            continue
        model, tok = load_model(resolve_model(name))
        cm, rec = qat.convert(model, scheme)
        srcs[case] = qat.save_converted(cm, tok, rec, out / case)
    return srcs


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("pte")
    reports = {}
    for case, (_, _, seq, ctx, dyn) in CASES.items():
        reports[case] = pte.export(sources[case], out / case, max_seq_len=seq, max_context_len=ctx, dynamic_shape=dyn)
    return reports


def _eager(src: Path):
    if (src / "scheme.json").exists():
        model, tok, _ = qat.load_converted(src)
    else:
        model, tok = load_model(src)
    return model.eval(), tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_report_and_files(exports, case):
    r = exports[case]
    path = Path(r["path"])
    assert path.is_file() and path.stat().st_size == r["bytes"]
    assert (path.parent / "tokenizer.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    v = r["validation"]
    assert v["rel_err"] <= v["tolerance"]["rel"] and v["top1"] >= v["tolerance"]["top1"]
    assert v["runner_match"] and v["runner_tokens"] > 0 and v["greedy_tokens"] > 0
    assert r["dynamic_shape"] == CASES[case][4]
    assert r["max_seq_len"] == (CASES[case][2] if CASES[case][4] else MAX_SEQ)
    assert isinstance(r["warnings"], list) and r["seconds"]["total"] > 0
    if CASES[case][1] is None:
        assert r["scheme"] == "float" and v["rel_err"] <= 1e-3 and v["greedy_agreement"] == 1.0
    else:
        scheme = CASES[case][1]
        assert r["scheme"] == getattr(scheme, "name", scheme) and r["linears"] == {"dyn-act": 29}


def test_quantization_is_carried(exports):
    """phone-deployment: int8 embedding kernel in the program and the size of int4/int8 weights."""
    phone, flt = exports["llama-phone"], exports["llama-float"]
    assert phone["embedding"] == "int8 (embedding_byte)"
    assert flt["embedding"] == "float32"
    # 8192x256 embedding int8 (2 MiB) + 29 int4 linears (~2.4M weights, ~1.5 MiB with scales) vs ~29 MiB float
    assert phone["bytes"] < 0.25 * flt["bytes"]
    # 8 of the 29 linears (gate/up, 4 layers) at int8: bigger than all-int4, and as big as int8 weights make it
    mixed = exports["llama-phone-mse-int8-mlp"]
    assert phone["bytes"] < mixed["bytes"] < 0.5 * flt["bytes"]
    assert abs(mixed["bytes"] - mixed["expected_bytes"]) < 0.05 * mixed["bytes"]
    q3 = exports["qwen3-int8-int4"]
    assert q3["embedding"] == "float32" and q3["bytes"] < 0.6 * exports["qwen3-float"]["bytes"]


def test_metadata_methods(exports, sources):
    r = exports["qwen3-float"]
    rt = PteRuntime(r["path"])
    cfg = json.loads((sources["qwen3-float"] / "config.json").read_text())
    assert (rt.max_seq_len, rt.max_context_len, rt.vocab_size) == (32, MAX_SEQ, cfg["vocab_size"])
    assert cfg["eos_token_id"] in rt.eos_ids and rt.dynamic
    rt.close()
    static = PteRuntime(exports["qwen3-int8-int4"]["path"])
    assert not static.dynamic and static.max_seq_len == static.max_context_len == MAX_SEQ
    static.close()


@pytest.mark.parametrize("case", CASES)
def test_runtime_logits_match_eager(exports, sources, case):
    model, tok = _eager(sources[case])
    ids = tok(TEXT + " " + TEXT + " " + TEXT).input_ids  # > 32 tokens: chunked prefill on qwen3-float
    assert len(ids) > 40
    rt = load_runtime("pte", exports[case]["path"])
    got = rt.logits(ids)
    ref = EagerRuntime(model).logits(ids)
    assert got.shape == ref.shape and got.dtype == torch.float32
    tol = exports[case]["validation"]["tolerance"]["rel"]
    assert _rel(got, ref) <= (1e-3 if CASES[case][1] is None else tol)
    # a fresh context every call: other calls in between change nothing
    rt.logits(tok("Something else entirely.").input_ids)
    assert torch.equal(rt.logits(ids), got)
    rt.close()


@pytest.mark.parametrize("case", ["llama-float", "qwen3-float"])
def test_generate_equals_eager_greedy(exports, sources, case):
    model, tok = _eager(sources[case])
    ids = tok(TEXT).input_ids
    stop = {tok.eos_token_id}
    rt = PteRuntime(exports[case]["path"])
    want = EagerRuntime(model).generate(ids, 20, stop)
    assert rt.generate(ids, 20, stop) == want and len(want) > 0
    # stopping: make the 5th greedy token a stop token
    assert rt.generate(ids, 20, {want[4]}) == want[: want.index(want[4])]
    rt.close()


def test_quantized_generation_is_eager_greedy_teacher_forced(exports, sources):
    """Int8 activations make whole-sequence equality fragile across CPUs: each pte token must be eager's
    argmax given the same prefix, up to the exporter's near-tie allowance."""
    model, tok = _eager(sources["llama-phone"])
    ids = tok(TEXT).input_ids
    gen = PteRuntime(exports["llama-phone"]["path"]).generate(ids, 16, set())
    with torch.no_grad():
        logits = model(torch.tensor([ids + gen])).logits[0, len(ids) - 1 : -1]
    gap = (logits.max(-1).values - logits.gather(-1, torch.tensor(gen)[:, None])[:, 0]) / logits.std(-1)
    assert len(gen) == 16 and float(gap.max()) <= exports["llama-phone"]["validation"]["tolerance"]["gap"]
    assert float((gap == 0).float().mean()) >= 0.9


def test_text_llm_runner_matches_eager(exports, sources):
    """ExecuTorch's own runner (as on a phone), with the BOS the HF tokenizer adds, greedy."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    model, tok = _eager(sources["llama-float"])
    path = Path(exports["llama-float"]["path"])
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id
    want = EagerRuntime(model).generate(ids, 12, {tok.eos_token_id})
    pieces: list[str] = []
    runner = TextLLMRunner(str(path), str(path.parent / "tokenizer.json"))
    cfg = GenerationConfig(echo=False, max_new_tokens=len(want), temperature=0.0, num_bos=1)
    runner.generate(TEXT, cfg, token_callback=pieces.append)
    assert "".join(pieces) == tok.decode(want)


def test_mismatching_artifact_is_refused_and_old_file_kept(exports, sources, tmp_path, monkeypatch):
    """Another model's program of the same size (tiny-qwen3 for tiny-llama): refused by the numbers."""
    out = tmp_path / "exp"
    shutil.copytree(Path(exports["llama-float"]["path"]).parent, out)
    before = {p.name: _sha(p) for p in out.iterdir()}
    foreign = Path(exports["qwen3-float"]["path"]).read_bytes()
    assert abs(len(foreign) - exports["llama-float"]["bytes"]) < 2**20
    monkeypatch.setattr(pte, "_lower", lambda *a, **k: foreign)
    with pytest.raises(EdgeftError, match="validation failed against the eager model: logits rel_err"):
        pte.export(sources["llama-float"], out, max_seq_len=MAX_SEQ)
    assert {p.name: _sha(p) for p in out.iterdir()} == before  # nothing replaced, no temporary left


def test_quantized_program_for_float_source_is_refused(exports, sources, tmp_path, monkeypatch):
    """The phone-deployment program (same model, int4/int8) for the float source: refused by its size."""
    q = Path(exports["llama-phone"]["path"]).read_bytes()
    monkeypatch.setattr(pte, "_lower", lambda *a, **k: q)
    with pytest.raises(EdgeftError, match="MiB, the scheme's weights need"):
        pte.export(sources["llama-float"], tmp_path / "x", max_seq_len=MAX_SEQ)
    assert not (tmp_path / "x" / "model.pte").exists()


def test_float_program_for_phone_source_is_refused(exports, sources, tmp_path, monkeypatch):
    """The float program for the phone-deployment source (its weights up to the quantization grid): refused
    by the structure check of the written program, which lacks the int8 embedding kernel."""
    flt = Path(exports["llama-float"]["path"]).read_bytes()
    monkeypatch.setattr(pte, "_lower", lambda *a, **k: flt)
    with pytest.raises(EdgeftError, match="embedding_byte"):
        pte.export(sources["llama-phone"], tmp_path / "x", max_seq_len=MAX_SEQ)
    assert not (tmp_path / "x" / "model.pte").exists()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_weight_only_scheme_carries_its_integers(tmp_path, scheme):
    """int8 (per channel, XNNPACK f32-qc8w) and int4 (groups of 32: int8-stored codes, ExecuTorch's
    dequantize_per_channel kernel): the converted model to float precision, in a file that holds integers."""
    model, tok = load_model(resolve_model("tiny-llama"))
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cm, rec = qat.convert(model, scheme)
    src = qat.save_converted(cm, tok, rec, tmp_path / scheme)
    r = pte.export(src, tmp_path / "out", max_seq_len=32)
    assert r["linears"] == {"weight-only": 29}
    # int4 groups warn that the program is slower than float (the codes are dequantized on every call)
    assert [w for w in r["warnings"] if "int4 groups" in w] == ([] if scheme == "int8" else [r["warnings"][0]])
    assert len(r["warnings"]) == (scheme == "int4")
    v = r["validation"]
    assert v["tolerance"]["rel"] == pte.FLOAT_REL and v["rel_err"] <= 1e-4 and v["greedy_agreement"] == 1.0
    # the integers are in the file: int8 1 byte per weight (+ fp32 row scales), int4 codes 1 byte + fp32 scale
    # per 32 weights; a float program would be float_bytes
    per_weight = 1.0 if scheme == "int8" else 1.125
    assert r["bytes"] < float_bytes - 0.95 * (4 - per_weight) * linear_weights
    assert abs(r["bytes"] - r["expected_bytes"]) < 0.05 * r["expected_bytes"]
    from executorch.exir._serialize._program import deserialize_pte_binary

    prog = deserialize_pte_binary(Path(r["path"]).read_bytes())
    plan = next(p for p in getattr(prog, "program", prog).execution_plan if p.name == "forward")
    ops = {o.name for o in plan.operators}
    # int8: the dequantize is inside XNNPACK's weight-only linear; int4 groups: ExecuTorch's kernel rebuilds them
    assert ("quantized_decomposed::dequantize_per_channel" in ops) == (scheme == "int4")
    ref, _, _ = qat.load_converted(src)
    ids = tok(TEXT).input_ids
    rt = PteRuntime(r["path"])
    assert _rel(rt.logits(ids), EagerRuntime(ref).logits(ids)) <= 1e-4
    stop = {tok.eos_token_id}
    assert rt.generate(ids[:16], 12, stop) == EagerRuntime(ref).generate(ids[:16], 12, stop)
    rt.close()


@pytest.mark.parametrize("dtype,group", [(torch.int8, None), (torch.int4, 32), (torch.int4, None), (torch.int8, 32)])
def test_weight_only_linear_with_bias_lowers_exactly(dtype, group):
    """WeightOnlyIntxLinear on its own, with a bias (Qwen2's q/k/v): per-channel grids go to XNNPACK (int4
    as nibbles), grouped ones through dequantize_per_channel; both equal torchao's linear to float rounding."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from edgeft.devices.executorch_runtime import load_executorch_ops

    load_executorch_ops()
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    gran = PerGroup(group) if group else PerAxis(0)
    quantize_(torch.nn.Sequential(lin), IntxWeightOnlyConfig(weight_dtype=dtype, granularity=gran))
    x = torch.randn(1, 5, 128)
    with torch.no_grad():
        ref = lin(x)
        mod = pte.WeightOnlyIntxLinear(lin).eval()
        assert _rel(mod(x), ref) < 1e-6
        ep = torch.export.export(mod, (x,), strict=False)
    edge = to_edge_transform_and_lower(
        ep, partitioner=[pte._partitioner(True)], compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    buf = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)).buffer
    got = Runtime.get().load_program(buf).load_method("forward").execute([x])[0]
    assert _rel(got, ref) < 1e-5
    bytes_per_weight = {(torch.int8, None): 1, (torch.int4, None): 0.5}.get((dtype, group), 1.125)
    assert len(buf) < 128 * 96 * bytes_per_weight + 96 * 8 + 12_000  # integers, not 48 KiB of float


def test_corrupted_file_gives_one_clear_error(exports, tmp_path):
    bad = tmp_path / "model.pte"
    data = Path(exports["llama-float"]["path"]).read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(EdgeftError, match="ExecuTorch could not load"):
        PteRuntime(bad)
    with pytest.raises(EdgeftError, match="does not exist"):
        PteRuntime(tmp_path / "missing.pte")


def test_unsupported_architecture(tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_embd=64, n_head=2, vocab_size=8192)
    cfg.save_pretrained(tmp_path)
    shutil.copyfile(resolve_model("tiny-llama") / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(EdgeftError) as e:
        pte.export(tmp_path, tmp_path / "out")
    msg = str(e.value)
    assert "'gpt2' is not supported" in msg and "llama" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_bad_lengths(sources, tmp_path):
    with pytest.raises(EdgeftError, match="max_seq_len"):
        pte.export(sources["llama-float"], tmp_path, max_seq_len=256, max_context_len=128)
    with pytest.raises(EdgeftError, match="positions"):
        pte.export(sources["llama-float"], tmp_path, max_seq_len=128, max_context_len=10**6)


def test_runtime_refuses_too_long(exports):
    rt = PteRuntime(exports["llama-float"]["path"])
    with pytest.raises(EdgeftError, match="exceed"):
        rt.logits(list(range(MAX_SEQ + 1)))
    with pytest.raises(EdgeftError, match="empty"):
        rt.logits([])
