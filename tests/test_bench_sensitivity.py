"""bench/sensitivity.py's variants against edgeft's own PTQ: ``all`` must be the converted model's function, and the
partial / int8 variants must quantize exactly the modules they name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeft import qat
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model
from edgeft.qat.fake_quant import intx_per_group_sym

_BENCH = Path(__file__).parents[1] / "bench"
sys.path.insert(0, str(_BENCH))  # sensitivity.py imports its sibling accuracy.py
_spec = importlib.util.spec_from_file_location("bench_sensitivity", _BENCH / "sensitivity.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _model():
    model, _ = load_model(resolve_model("tiny-llama"))
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    return model.eval()


@pytest.mark.parametrize("weight_scale", ["absmax", "mse"])
def test_all_is_the_converted_model(weight_scale):
    plan = qat.resolve("phone-deployment", weight_scale=weight_scale)
    ids = torch.randint(0, 8192, (1, 24), generator=torch.Generator().manual_seed(0))
    model = _model()
    converted, _ = qat.convert(_model(), plan)
    S.apply_variant(model, "all", plan)
    with torch.no_grad():
        got, ref = model(input_ids=ids).logits, converted(input_ids=ids).logits
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-6


def test_partial_and_int8_variants_quantize_what_they_name():
    plan = qat.resolve("phone-deployment")
    float_model = _model()
    model = _model()
    done = S.apply_variant(model, "only=mlp", plan)
    assert done and all(".mlp." in n for n in done)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # attention left in float
    model = _model()
    S.apply_variant(model, "int8=down_proj", plan)
    w = float_model.model.layers[1].mlp.down_proj.weight.detach()
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, intx_per_group_sym(w, 8, None))
    up = float_model.model.layers[1].mlp.up_proj.weight.detach()
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, intx_per_group_sym(up, 4, 32))
    with pytest.raises(EdgeftError, match="unknown variant"):
        S.apply_variant(_model(), "only", plan)
