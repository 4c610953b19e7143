"""The device-fit planner (edgeft.qat.plan): the chooser against exhaustive search on synthetic sensitivities, the
impossible-budget error, the plan file's round trip, per-path int8 linears through convert, and the calibration
against an independent loss."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from torch import nn

from edgeft import qat
from edgeft.errors import EdgeftError
from edgeft.qat import plan as fit
from edgeft.qat.schemes import resolve

MB = fit.MB


def _shape(n: int = 6, rows: int = 256, cols: int = 512) -> fit.ModelShape:
    """n equal linears (so greedy upgrading is optimal and exhaustive search is the known answer)."""
    lins = tuple(fit.Linear(f"model.layers.{i}.mlp.down_proj", rows, cols) for i in range(n))
    cfg = {"layers": 2, "kv_heads": 2, "head_dim": 32, "vocab": 1024, "hidden": 128}
    return fit.ModelShape(lins, (1024, 128), 512, 4, cfg, vocab_bytes=20_000)


SENS = {
    32: dict(zip([f"model.layers.{i}.mlp.down_proj" for i in range(6)], [0.5, 0.02, 0.3, 0.01, 0.2, -0.01])),
    128: dict(zip([f"model.layers.{i}.mlp.down_proj" for i in range(6)], [0.6, 0.03, 0.35, 0.02, 0.25, 0.0])),
}


def _exhaustive(shape, sens, limit_bytes):
    """The least total int4 loss rise over every int8 subset whose .pte and GGUF fit the cap, at the finest group size
    where any fits."""
    best = None
    names = [lin.name for lin in shape.linears]
    for gs, s in sens.items():
        if best is not None and best[1] < gs:  # the finest group size that fits comes first
            break
        for k in range(len(names) + 1):
            for sub in itertools.combinations(names, k):
                if any(fit.artifact_bytes(shape, gs, set(sub), "int8", a) > limit_bytes for a in fit.ARTIFACTS):
                    continue
                rise = sum(s[n] for n in names if n not in sub)
                key = (round(rise, 12), fit.artifact_bytes(shape, gs, set(sub), "int8", "pte"))
                if best is None or key < best[0]:
                    best = (key, gs, set(sub))
    return best


@pytest.mark.parametrize("extra_upgrades", [0, 1, 2, 3])
def test_chooser_is_the_exhaustive_optimum(extra_upgrades):
    shape = _shape()
    # a cap that holds the g128 all-int4 model plus `extra_upgrades` int8 linears (and g32 one fewer or so)
    base = max(fit.artifact_bytes(shape, 128, set(), "int8", a) for a in fit.ARTIFACTS)
    step = fit.tensor_bytes("int8", 256, 512, "gguf") - fit.tensor_bytes("int4-g128", 256, 512, "gguf")
    cap = base + extra_upgrades * step + step // 3
    plan = fit.choose(shape, SENS, fit.Budget(max_size_mb=cap / MB))
    ref = _exhaustive(shape, SENS, cap)
    assert ref is not None
    assert (plan.group_size, set(plan.int8_modules)) == (ref[1], ref[2])
    assert plan.predicted["loss_rise"] == pytest.approx(ref[0][0])
    for a in fit.ARTIFACTS:
        assert plan.predicted[a]["bytes"] <= cap


def test_the_finest_fitting_group_size_wins_over_a_lower_predicted_rise():
    """The calibration's rises are PTQ's; QAT recovers fine groups more (docs/device-fit.md): g32 is taken while it
    fits even where g128 with more int8 upgrades predicts less."""
    shape = _shape()
    low128 = {32: SENS[32], 128: {n: r / 10 for n, r in SENS[128].items()}}
    cap = max(fit.artifact_bytes(shape, 32, set(), "int8", a) for a in fit.ARTIFACTS) + 1000
    plan = fit.choose(shape, low128, fit.Budget(max_size_mb=cap / MB))
    assert plan.group_size == 32
    g128 = [c for c in plan.candidates if c["group_size"] == 128 and c["fits"] and c["kv_cache"] == "fp32"]
    assert g128 and min(c["loss_rise"] for c in g128) < plan.predicted["loss_rise"]
    assert "set aside: g32 fits" in plan.why
    small = max(fit.artifact_bytes(shape, 128, set(), "int8", a) for a in fit.ARTIFACTS) + 1000  # g32 cannot fit
    assert fit.choose(shape, low128, fit.Budget(max_size_mb=small / MB)).group_size == 128


def test_known_answer_top_sensitivities_get_int8():
    shape = _shape()
    g32 = {32: SENS[32]}
    base = max(fit.artifact_bytes(shape, 32, set(), "int8", a) for a in fit.ARTIFACTS)
    step = max(fit.tensor_bytes("int8", 256, 512, a) - fit.tensor_bytes("int4-g32", 256, 512, a) for a in fit.ARTIFACTS)
    plan = fit.choose(shape, g32, fit.Budget(max_size_mb=(base + 2 * step + 10) / MB))
    assert set(plan.int8_modules) == {"model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    formats = {t["name"]: t["format"] for t in plan.tensors}
    assert formats["model.layers.4.mlp.down_proj"] == "int4-g32" and formats["embedding"] == "int8"
    why = {t["name"]: t["why"] for t in plan.tensors}
    assert "did not fit" in why["model.layers.4.mlp.down_proj"]
    assert "does not raise the loss" in why["model.layers.5.mlp.down_proj"]  # rise <= 0: never upgraded
    # ample room: every linear whose int4 grid costs anything goes int8, and nothing else
    roomy = fit.choose(shape, g32, fit.Budget(max_size_mb=100))
    assert set(roomy.int8_modules) == {n for n, s in SENS[32].items() if s > 0}


def test_one_artifact_budget():
    """--fit-artifact pte: the GGUF (whose Q4_0 blocks cannot shrink with the group size) may exceed the cap."""
    shape = _shape(rows=1024, cols=1024)
    gguf_floor = fit.artifact_bytes(shape, 32, set(), "int8", "gguf")
    cap = fit.artifact_bytes(shape, 128, set(), "int8", "pte") + 1000
    assert cap < gguf_floor
    with pytest.raises(EdgeftError, match="gguf limit"):
        fit.choose(shape, SENS, fit.Budget(max_size_mb=cap / MB))
    plan = fit.choose(shape, SENS, fit.Budget(max_size_mb=cap / MB, artifact="pte"))
    assert plan.group_size == 128 and plan.predicted["pte"]["bytes"] <= cap < plan.predicted["gguf"]["bytes"]
    with pytest.raises(EdgeftError, match="--fit-artifact"):
        fit.choose(shape, SENS, fit.Budget(max_size_mb=1, artifact="onnx"))


def test_device_budget_limits_memory_and_decode():
    from edgeft.devices.profiles import estimate, get_profile

    shape = _shape()
    plan = fit.choose(shape, SENS, fit.Budget(device="android-4gb", min_decode=5.0, context=1024))
    p = get_profile("android-4gb")
    for a in fit.ARTIFACTS:
        kv = fit._kv_bytes(shape, 1024, "fp32", a)
        e = estimate(p, plan.predicted[a]["bytes"], kv, shape.config)
        assert e["fits"] and e["decode_low"] >= 5.0
        assert plan.predicted[a]["runtime_memory_mb"] == pytest.approx(e["memory"] / MB, abs=0.1)
    # a decode floor no size can meet: one error naming the smallest plan and its size
    with pytest.raises(EdgeftError, match=r"no plan fits.*smallest.*--min-decode 1e\+06"):
        fit.choose(shape, SENS, fit.Budget(device="android-4gb", min_decode=1e6))


def test_impossible_budget_names_the_smallest_plan():
    shape = _shape()
    smallest = fit.artifact_bytes(shape, 128, set(), "int4", "pte")  # int4 embeddings are the smallest
    with pytest.raises(EdgeftError) as e:
        fit.choose(shape, SENS, fit.Budget(max_size_mb=0.05))
    msg = str(e.value)
    assert "\n" not in msg and "int4 g128" in msg and "int4 embeddings" in msg and "--max-size 0.05 MB" in msg
    assert re.search(r"is ([\d.]+) MB as \.pte", msg).group(1) == f"{smallest / MB:.1f}"


@pytest.mark.parametrize(
    "bad",
    [
        fit.Budget(),
        fit.Budget(max_size_mb=-1),
        fit.Budget(min_decode=3, max_size_mb=9),
        fit.Budget(device="nokia-3310"),
    ],
)
def test_unreadable_budgets_are_refused(bad):
    with pytest.raises(EdgeftError):
        fit.choose(_shape(), SENS, bad)


def test_plan_file_round_trip(tmp_path):
    plan = fit.choose(
        _shape(),
        SENS,
        fit.Budget(device="pixel-8", max_size_mb=0.8, context=512),
        calibration={"float_loss": 1.25, "sensitivity": {"32": SENS[32]}},
    )
    path = plan.write(tmp_path)
    assert path.name == "qat_plan.json" and not list(tmp_path.glob("*.tmp*"))
    back = fit.load(tmp_path)
    assert back == plan
    assert json.loads(path.read_text())["int8_modules"] == list(plan.int8_modules)
    q = back.qat_plan()
    assert q.name == "auto" and q.scheme.name == "int8-int4" and q.embedding == "int8-per-channel"
    assert q.group_size == plan.group_size and q.int8_modules == plan.int8_modules
    assert qat.QATPlan.from_dict(json.loads(json.dumps(q.to_dict()))) == q  # convert's record reloads
    lines = plan.summary()
    assert all(any(t["name"] in line for line in lines) for t in plan.tensors)
    assert fit.load(tmp_path / "nowhere") is None
    (tmp_path / "qat_plan.json").write_text("{not json")
    with pytest.raises(EdgeftError, match="not valid JSON"):
        fit.load(tmp_path)


def _tiny():
    from edgeft.models import load_model, resolve_model

    model, tok = load_model(resolve_model("tiny-llama"))
    return model.eval(), tok


def test_int8_paths_reach_convert():
    plan = resolve("auto", 64, int8_modules=("model.layers.1.mlp.down_proj", "lm_head"))
    assert plan.is_int8("base_model.model.model.layers.1.mlp.down_proj")  # PEFT's names match too
    assert not plan.is_int8("model.layers.11.mlp.down_proj") and not plan.is_int8("model.layers.0.mlp.down_proj")
    model, _ = _tiny()
    converted, record = qat.convert(model, plan)
    assert sorted(record["int8_linears"]) == ["lm_head", "model.layers.1.mlp.down_proj"]
    w = converted.model.layers[1].mlp.down_proj.weight
    assert w.target_dtype == torch.int8 and tuple(w.block_size) == (1, w.shape[1])
    w0 = converted.model.layers[0].mlp.down_proj.weight
    assert w0.target_dtype == torch.int4 and tuple(w0.block_size) == (1, 64)
    with pytest.raises(EdgeftError, match="names no linear"):
        qat.convert(_tiny()[0], resolve("auto", int8_modules=("model.layers.9.mlp.down_proj",)))
    with pytest.raises(EdgeftError, match="paths such as"):
        resolve("auto", int8_modules=("layers.1.mlp.down proj",))


def test_calibration_is_the_loss_rise_of_one_int4_linear():
    """linear_sensitivity against HF's own loss (labels=) on a model with one linear quantized by hand."""
    from edgeft.qat.fake_quant import act_ref, intx_per_group_sym
    from edgeft.qat.prepare import plan_specs
    from edgeft.qat.sensitivity import linear_sensitivity

    model, tok = _tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 8192, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batches = [{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}]
    plan = resolve("auto", 32)
    names = ["model.layers.2.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    r = linear_sensitivity(model, batches, plan, (32,), names=names)
    act, _ = plan_specs(plan)
    with torch.no_grad():
        base = float(model(input_ids=ids, labels=labels).loss)
        assert r["float_loss"] == pytest.approx(base, rel=1e-5)
        for name in names:
            ref_model, _ = _tiny()
            lin = ref_model.get_submodule(name)
            wq = intx_per_group_sym(lin.weight.detach(), 4, 32)

            class Ref(nn.Module):
                def forward(self, x, w=wq):
                    return nn.functional.linear(act_ref(x, act), w)

            parent, _, child = name.rpartition(".")
            setattr(ref_model.get_submodule(parent), child, Ref())
            rise = float(ref_model(input_ids=ids, labels=labels).loss) - base
            # HF's losses are fp32 (~9 here): the reference rise carries each loss's rounding, about one ulp of
            # the loss apiece (1.5e-6 measured on an AVX-512 EPYC, 1.6 ulp): 4 ulp of the loss, 1% of the rise
            ulp = torch.finfo(torch.float32).eps * base
            assert r["sensitivity"][32][name] == pytest.approx(rise, rel=1e-3, abs=4 * ulp)
    assert r["tokens"] == int((labels[:, 1:] != -100).sum())
    # the model is left as it was
    assert type(model.model.layers[2].mlp.down_proj) is nn.Linear


def test_device_flag_names_a_profile_or_a_torch_device():
    from edgeft.config import TrainConfig, fit_budget
    from edgeft.config import resolve as resolve_cfg

    cfg = resolve_cfg(TrainConfig(model="tiny-llama", qat="auto", device="pixel-8", fit_context=1024))
    assert cfg.fit.device == "pixel-8" and cfg.hardware.device in ("cpu", "cuda") and cfg.model.mode == "full"
    assert fit_budget(cfg) == fit.Budget("pixel-8", None, None, 1024, "both")
    assert resolve_cfg(TrainConfig(model="tiny-llama", device="cpu")).hardware.device == "cpu"
    with pytest.raises(EdgeftError, match="two target devices"):
        resolve_cfg(TrainConfig(qat="auto", device="pixel-8").replace(fit_device="galaxy-s24"))


def test_unmeasured_formats_only_when_needed():
    """int4 embeddings / an int8 KV cache (no measured loss rise) are taken only when no int8/fp32 plan fits, and
    then the plan trains and exports them: the QAT plan's embedding treatment, the sizes of what the .pte holds."""
    shape = _shape()
    roomy = fit.choose(shape, SENS, fit.Budget(max_size_mb=1.0))
    assert (roomy.embedding, roomy.kv_cache) == ("int8", "fp32")
    assert roomy.qat_plan().embedding == "int8-per-channel"
    int8_emb = max(fit.artifact_bytes(shape, 128, set(), "int8", a) for a in fit.ARTIFACTS)
    int4_emb = max(fit.artifact_bytes(shape, 128, set(), "int4", a) for a in fit.ARTIFACTS)
    assert int4_emb < int8_emb
    tight = fit.choose(shape, SENS, fit.Budget(max_size_mb=(int4_emb + int8_emb) / 2 / MB))
    assert tight.embedding == "int4" and tight.kv_cache == "fp32"  # a size cap: the cache does not help
    assert tight.qat_plan().embedding == "int4-per-group"
    assert qat.QATPlan.from_dict(tight.qat_plan().to_dict()).embedding == "int4-per-group"
    emb = next(t for t in tight.tensors if t["name"] == "embedding")
    assert emb["bytes"]["pte"] == 1024 * 128 // 2 + 1024 * 128 // 32 * 4 and "only when needed" in emb["why"]
    # the int8 cache holds 1 byte per element plus an fp32 scale and int8 zero point per (position, head)
    ctx = 4096
    assert fit._kv_bytes(shape, ctx, "int8", "pte") == 2 * 2 * 2 * ctx * (32 + 5)
    assert fit._kv_bytes(shape, ctx, "int8", "gguf") == fit._kv_bytes(shape, ctx, "fp32", "gguf")


def test_why_names_every_candidate_once_and_why_a_fitting_one_lost():
    """The plan's ``why`` tells the candidates apart (group size, embedding and KV formats: the group size alone
    repeats) and says of a candidate that fits on an unmeasured format that it was set aside for that, not that
    it lost on loss rise (its rise leaves the format's own loss out, so it can be the lower number)."""
    shape = _shape()
    int8_emb = max(fit.artifact_bytes(shape, 128, set(), "int8", a) for a in fit.ARTIFACTS)
    # room for the int8-embedding plan with few int8 linears, and for the int4-embedding one with more
    plan = fit.choose(shape, SENS, fit.Budget(max_size_mb=(int8_emb + 20_000) / MB))
    assert (plan.embedding, plan.kv_cache) == ("int8", "fp32")
    parts = plan.why.split("; ")
    labels = [p.split(":")[0] for p in parts[1:-1]]
    assert parts[0].startswith("g128 int8 embeddings fp32 KV with ")
    assert len(labels) == len(set(labels)) == len(plan.candidates) - 1, plan.why
    int4 = next(p for p in parts if p.startswith("g128 int4 embeddings fp32 KV:"))
    assert "fits at" in int4 and "not counting its int4 embedding" in int4 and "taken only when needed" in int4


def test_embedding_calibration_is_the_loss_rise_of_the_converted_embedding():
    """embedding_sensitivity against HF's own loss with the embedding as convert writes it (torchao's weight-only
    config, dequantized): int8 per row and int4 in groups of 32, the head untied and left float."""
    from torchao.quantization import quantize_

    from edgeft.qat.schemes import embedding_treatment_config
    from edgeft.qat.sensitivity import embedding_sensitivity, untie_head

    model, _ = _tiny()
    untie_head(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 8192, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batches = [{"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}]
    w0 = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        base = float(model(input_ids=ids, labels=labels).loss)
    treatments = {"int8": "int8-per-channel", "int4": "int4-per-group"}
    got = embedding_sensitivity(model, batches, resolve("auto", 32), treatments, base)
    assert torch.equal(model.get_input_embeddings().weight, w0)  # left as it was
    ulp = torch.finfo(torch.float32).eps * base
    for fmt, treatment in treatments.items():
        e = nn.Embedding.from_pretrained(w0.clone())
        quantize_(e, embedding_treatment_config(treatment), filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
        ref, _ = _tiny()
        untie_head(ref)
        with torch.no_grad():
            ref.get_input_embeddings().weight.copy_(e.weight.dequantize())
            rise = float(ref(input_ids=ids, labels=labels).loss) - base
        # both losses are fp32 (~9): 4 ulp of the loss, as the linears' test above
        assert got[fmt] == pytest.approx(rise, rel=1e-3, abs=4 * ulp), fmt
    assert got["int4"] > got["int8"]  # the coarser grid costs more on this model


def test_measured_embedding_rises_decide_the_embedding_format():
    """Given the embedding's measured rises, int4 embeddings are chosen when they give the least total rise (the
    bytes they free buy int8 linears), int8 when int4 costs more than those upgrades save; without them, int4 only
    when needed (test_unmeasured_formats_only_when_needed)."""
    shape, sens = _shape(), {128: SENS[128]}  # one group size: the embedding decides alone
    int8_emb = max(fit.artifact_bytes(shape, 128, set(), "int8", a) for a in fit.ARTIFACTS)
    budget = fit.Budget(max_size_mb=(int8_emb + 20_000) / MB)  # int8 embeddings fit, with few int8 linears
    assert fit.choose(shape, sens, budget).embedding == "int8"
    cheap = fit.choose(shape, sens, budget, embedding_sensitivity={"int8": 0.0, "int4": 1e-9})
    assert cheap.embedding == "int4" and len(cheap.int8_modules) > len(fit.choose(shape, sens, budget).int8_modules)
    emb = next(t for t in cheap.tensors if t["name"] == "embedding")
    assert emb["loss_rise"] == 1e-9 and "counted in the plan's" in emb["why"]
    assert cheap.predicted["loss_rise"] == pytest.approx(
        sum(SENS[128].get(lin.name, 0.0) for lin in shape.linears if lin.name not in cheap.int8_modules) + 1e-9
    )
    costly = fit.choose(shape, sens, budget, embedding_sensitivity={"int8": 0.0, "int4": 10.0})
    assert costly.embedding == "int8"
    int4 = next(p for p in costly.why.split("; ") if p.startswith("g128 int4 embeddings fp32 KV: "))
    assert float(int4.split(": ")[1]) > costly.predicted["loss_rise"]  # lost on its measured rise, not set aside
