"""The eager runtime's device (``edgeft eval --device``): loaded and checked on the CPU, then moved; on a GPU it
answers as the CPU does up to rounding (the int8 activation roundings that a re-associated sum can flip)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeft import qat
from edgeft.devices.runtimes import load_runtime
from edgeft.models import resolve_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = resolve_model("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    out, record = qat.convert(model, "int8-int4")
    return qat.save_converted(out, AutoTokenizer.from_pretrained(str(src)), record, tmp_path_factory.mktemp("c") / "m")


IDS = [1, 17, 301, 4095, 12, 77, 8000, 5, 9, 1024, 33, 2]


def test_the_cpu_device_is_the_default_and_other_options_are_refused(converted):
    ref = load_runtime("eager", converted).logits(IDS)
    rt = load_runtime("eager", converted, device="cpu")
    assert rt.model.device.type == "cpu"
    assert torch.equal(rt.logits(IDS), ref)
    with pytest.raises(TypeError, match="unexpected options"):
        load_runtime("eager", converted, n_ctx=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_answers_as_the_cpu_does(converted):
    cpu = load_runtime("eager", converted)
    gpu = load_runtime("eager", converted, device="cuda")
    assert gpu.model.device.type == "cuda"
    a, b = gpu.logits(IDS), cpu.logits(IDS)
    # the bench's artifact tolerance (bench/accuracy.py TARGETS: relative error 2e-2); a random tiny model's logits
    # are near ties, so its argmax is no test of agreement
    assert float((a - b).norm() / b.norm()) <= 2e-2
    assert len(gpu.generate(IDS, 8, set())) == 8
