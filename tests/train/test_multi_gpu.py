"""Two GPUs (NCCL) under `torchrun --nproc_per_node 2 -m edgeft train`: DDP and FSDP2 give one GPU's losses at the same
global batch on a tiny model (LoRA with the Triton kernels in fp32; full fine-tuning in bf16 under FSDP2's mixed
precision policy), and an FSDP2 run resumes from its gathered checkpoint. Skips where fewer than two CUDA GPUs exist.

Standalone: ``python -m pytest -q tests/train/test_multi_gpu.py`` (about two minutes on two H200s; needs edgeft's
base dependencies only: no torchao or executorch).
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason=f"needs two CUDA GPUs (found {torch.cuda.device_count() if torch.cuda.is_available() else 0})",
    ),
]

BASE = [
    "train",
    "--model",
    "tiny-llama",
    "--max-steps",
    "4",
    "--grad-accum",
    "2",
    "--lr",
    "1e-3",
    "--no-progress",
    "--device",
    "cuda",
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from edgeft.data import tasks

    path = tmp_path_factory.mktemp("data") / "tasks.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": tasks.to_messages(r)}) + "\n" for r in tasks.generate("train")[:64])
    )
    return path


def _edgeft(cwd, args, nproc):
    """``edgeft`` on one GPU (in this process), or under torchrun on ``nproc`` GPUs."""
    if nproc == 1:
        from edgeft.cli import main

        assert main(args) == 0
        return None
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "edgeft",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _same(one, many, rel):
    a, b = _rows(one / "metrics.jsonl"), _rows(many / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # one writer
    assert [r["target_tokens"] for r in b] == [r["target_tokens"] for r in a]  # the same global batches
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=rel)
    return a, b


def _weights(run):
    from safetensors.torch import load_file

    d = run / "model"
    f = d / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else d / "model.safetensors"))


def test_ddp_and_fsdp2_lora_with_kernels_equal_one_gpu(tmp_path, data):
    args = [*BASE, "--data", str(data), "--lora", "--dtype", "fp32", "--kernels", "on"]
    one = tmp_path / "one"
    _edgeft(tmp_path, [*args, "--batch-size", "4", "--out", str(one)], 1)
    wa = _weights(one)
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        proc = _edgeft(
            tmp_path, [*args, "--batch-size", "2", "--out", str(run), "--distributed", strategy, "--save-steps", "2"], 2
        )
        assert proc.stdout.count("run: ") == 1  # only rank 0 reports
        assert f"2 processes, {'FSDP2' if strategy == 'fsdp' else 'DDP'}" in proc.stderr
        _same(one, run, rel=1e-4)
        wb = _weights(run)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-3, msg=f"{strategy} {k}")

    # FSDP2 resume on NCCL: the step-2 checkpoint (gathered on rank 0) continues as the uninterrupted run did
    ref, run = tmp_path / "fsdp", tmp_path / "fsdp-resumed"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("step-4", "model", "converted", "loss.png"))
    proc = _edgeft(tmp_path, ["train", "--out", str(run), "--resume", "--no-progress"], 2)
    assert "at step 2" in proc.stderr
    _same(ref, run, rel=1e-5)


def test_fsdp2_full_finetuning_bf16_equals_one_gpu(tmp_path, data):
    # bf16 weights (as one GPU trains them), gradients reduce-scattered in fp32: bf16 rounding apart, the same run
    args = [*BASE, "--data", str(data), "--full", "--dtype", "bf16", "--lr", "1e-4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _edgeft(tmp_path, [*args, "--batch-size", "4", "--out", str(one)], 1)
    proc = _edgeft(tmp_path, [*args, "--batch-size", "2", "--out", str(two), "--fsdp"], 2)
    assert "2 processes, FSDP2" in proc.stderr
    a, b = _same(one, two, rel=2e-2)
    assert b[-1]["loss"] < b[0]["loss"]
    wa, wb = _weights(one), _weights(two)
    assert set(wa) == set(wb) and all(t.dtype == torch.bfloat16 for t in wb.values())
