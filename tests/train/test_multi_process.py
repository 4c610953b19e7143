"""`torchrun --nproc_per_node 2 -m edgeft train`: two data-parallel processes at batch B give one process's losses at
batch 2B (gloo on CPU here; NCCL on two GPUs where they exist)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edgeft.cli import main
from edgeft.data import tasks


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _compare(tmp_path, device_args, rel):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": tasks.to_messages(r)}) + "\n" for r in tasks.generate("train")[:64])
    )
    args = [
        "train",
        "--model",
        "tiny-llama",
        "--data",
        str(data),
        "--lora",
        "--max-steps",
        "4",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--no-progress",
        "--threads",
        "1",
        *device_args,
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--batch-size", "4", "--out", str(one)]) == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "edgeft",
            *args,
            "--batch-size",
            "2",
            "--out",
            str(two),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1  # only rank 0 reports
    a, b = _rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # one writer
    assert [r["target_tokens"] for r in b] == [r["target_tokens"] for r in a]  # the same global batches
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=rel)
    wa = load_file(str(one / "model" / "adapter_model.safetensors"))
    wb = load_file(str(two / "model" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rel * 10, atol=rel * 10, msg=k)


def test_two_cpu_processes_equal_one_at_the_same_global_batch(tmp_path):
    _compare(tmp_path, ["--device", "cpu"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_equal_one_at_the_same_global_batch(tmp_path):
    _compare(tmp_path, ["--device", "cuda", "--dtype", "fp32", "--kernels", "on"], rel=1e-4)
