"""`torchrun --nproc_per_node 2 -m edgeft train --fsdp`: FSDP2 (gloo on CPU here) gives one process's losses at the
same global batch, for LoRA (frozen base sharded too) and full fine-tuning, with evaluation, QAT and the kernels;
its checkpoints resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgeft.cli import main
from edgeft.data import tasks
from edgeft.errors import EdgeftError

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
    "--threads",
    "1",
    "--device",
    "cpu",
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _data(tmp_path):
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        "".join(json.dumps({"messages": tasks.to_messages(r)}) + "\n" for r in tasks.generate("train")[:64])
    )
    return data


PROBE = Path(__file__).with_name("_fsdp_probe.py")  # `python -m edgeft` recording each rank's loading


def _torchrun(tmp_path, args, env=None, loads=1):
    """``torchrun -m edgeft`` with 2 processes, through the probe; checks that only rank 0 loaded weights (see
    :func:`_check_loading`, ``loads``: the models each rank shards); returns the process and the probe folder."""
    probe = tmp_path / f"probe-{len(list(tmp_path.glob('probe-*')))}"
    probe.mkdir()
    env = dict(os.environ if env is None else env, EDGEFT_PROBE_DIR=str(probe))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_loading(probe, loads)
    return proc, probe


def _check_loading(probe, loads):
    """Rank 1 never reads a checkpoint nor holds a whole weight before sharding (it builds on meta), ends up with
    about half the parameters, and its non-persistent buffers (rotary inv_freq) are exactly rank 0's."""
    r0, r1 = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["from_pretrained"]
    assert r1["from_pretrained"] == []
    assert len(r1["fully_shard"]) == len(r0["fully_shard"]) > 0
    assert [c["whole_bytes"] for c in r1["fully_shard"]] == [0] * len(r1["fully_shard"])
    assert sum(c["whole_bytes"] for c in r0["fully_shard"]) > 0  # what the old code did on every rank
    assert len(r0["loaded"]) == len(r1["loaded"]) == loads
    for a, b in zip(r0["loaded"], r1["loaded"]):
        assert not a["meta"] and not b["meta"]
        assert set(b["buffers"]) == set(a["buffers"]) and any("inv_freq" in k for k in a["buffers"])
        for k in a["buffers"]:
            assert b["buffers"][k] == a["buffers"][k], k
        assert b["params"] == a["params"]
        assert b["local_params"] <= 0.55 * b["params"]  # its shards only


def _weights(run):
    d = run / "model"
    f = d / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else d / "model.safetensors"))


# QAT distilled from its twin (int8-int4, LoRA, 4 steps): one process under other equally correct orders (batch 4 x
# accumulation 2, 2 x 4, 8 x 1, ATEN_CPU_CAPABILITY=default; materialised and fused heads) agrees at step 1 to 1.3e-4
# (loss) and 1.2% (gradient norm); after an update, int4/int8 grid points flipped by last-bit differences part the
# trajectories: losses by up to 1.1e-3, gradient norms by up to 17%, the KL by up to 10% (docs/testing.md). Bounds
# ~3x those after step 1; ranks that trained on the same half of each batch are 4.7% off in loss at step 1.
QAT_DISTILL = dict(rel=1e-3, grad_rel=5e-2, drift=(3e-3, 0.5))
QAT_DISTILL_KL = 0.3


def _compare(tmp_path, extra, rel, wtol, env=None, grad_rel=None, loads=1, drift=None):
    """One process at batch 4 against two FSDP2 processes at batch 2: losses within ``rel`` and gradient norms
    within ``grad_rel`` at every step, or, with ``drift`` = (loss rel, grad-norm rel), at the first step only (before
    any update, so only summation order differs) and within ``drift`` after it, where QAT's rounding flips let two
    equally correct runs part."""
    args = [*BASE, "--data", str(_data(tmp_path)), *extra]
    one, two = tmp_path / "one", tmp_path / "two"
    if env is None:
        assert main([*args, "--batch-size", "4", "--out", str(one)]) == 0
    else:
        p = subprocess.run(
            [sys.executable, "-m", "edgeft", *args, "--batch-size", "4", "--out", str(one)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env=env,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        (tmp_path / "one.stderr").write_text(p.stderr)
    proc, _ = _torchrun(tmp_path, [*args, "--batch-size", "2", "--out", str(two), "--fsdp"], env, loads)
    (tmp_path / "two.stderr").write_text(proc.stderr)
    assert proc.stdout.count("run: ") == 1  # only rank 0 reports
    assert "2 processes, FSDP2" in proc.stderr
    a, b = _rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["target_tokens"] for r in b] == [r["target_tokens"] for r in a]  # the same global batches
    # the gradients agree to fp32 (the losses above); their norm is summed per shard, and the CPU's fp32 norm of a
    # whole 8192x256 gradient is itself off by up to ~1e-3 (checked against float64), so only roughly here
    grad_rel = grad_rel or max(rel, 2e-3)
    n_tight = 1 if drift else len(a)
    later_rel, later_grad = drift or (rel, grad_rel)
    for key, tight, loose in (("loss", rel, later_rel), ("grad_norm", grad_rel, later_grad)):
        assert [r[key] for r in b[:n_tight]] == pytest.approx([r[key] for r in a[:n_tight]], rel=tight), key
        assert [r[key] for r in b[n_tight:]] == pytest.approx([r[key] for r in a[n_tight:]], rel=loose), key
    ev_a, ev_b = [r["eval_loss"] for r in a if "eval_loss" in r], [r["eval_loss"] for r in b if "eval_loss" in r]
    assert ev_b == pytest.approx(ev_a, rel=later_rel)
    info = json.loads((two / "model" / "edgeft.json").read_text())
    assert info["train"]["distributed"] == "fsdp"
    wa, wb = _weights(one), _weights(two)  # rank 0 saved the whole trained model, gathered from the shards
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=wtol, atol=wtol, msg=k)
    assert (two / "converted" / "scheme.json").exists()
    return a, ev_a


def test_fsdp_lora_with_evaluation_equals_one_process(tmp_path):
    # 5 eval units over 2 ranks at batch 2: rank 1 runs one forward fewer of its own and repeats one (collectives)
    _, ev = _compare(tmp_path, ["--lora", "--eval-split", "5", "--eval-steps", "2"], rel=1e-5, wtol=1e-4)
    assert len(ev) == 2


def test_fsdp_full_finetuning_equals_one_process(tmp_path):
    _compare(tmp_path, ["--full"], rel=1e-5, wtol=1e-4)


def test_fsdp_bf16_lora_equals_one_process(tmp_path):
    # bf16 frozen base and fp32 adapters (as peft makes them) sharded together, gradients reduced in fp32; bf16
    # rounding flips the sign of a few tiny gradient entries, which AdamW turns into +-lr steps (0.2% of entries): two
    # runs can then be 2 * lr * 4 steps = 8e-3 apart in a weight. Measured between one process's equally correct
    # orders (batch 4 x 2, 2 x 4, 8 x 1, ATEN_CPU_CAPABILITY=default): weights 3.6e-3, losses 1.1e-4, gradient norms
    # 1.6e-3 apart (docs/testing.md)
    _compare(tmp_path, ["--lora", "--dtype", "bf16"], rel=1e-3, wtol=1e-2, grad_rel=5e-3)


def test_fsdp_with_qat_and_kernels_equals_one_process(tmp_path):
    # fake quantization turns last-bit differences (another summation order) into another grid point now and then:
    # DDP drifts from one process by the same ~1e-4 on this model, so the tolerance is QAT's, not FSDP's. The
    # kernels' patched forwards and Functions run their PyTorch references here (no Triton interpreter: minutes);
    # test_multi_gpu.py runs the Triton kernels under FSDP2
    # Noise floor (one process, batch 4 x 2, 2 x 4, 8 x 1, ATEN_CPU_CAPABILITY=default): losses 5.8e-4, gradient
    # norms 1.4e-3 apart (docs/testing.md); bounds ~3.5x that
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _compare(
        tmp_path,
        ["--qat", "phone-deployment", "--no-ptq", "--kernels", "on"],
        rel=2e-3,
        wtol=5e-2,
        env=env,
        grad_rel=5e-3,
    )
    info = json.loads((tmp_path / "two" / "model" / "edgeft.json").read_text())
    assert info["qat"] and info["kernels"]


def test_fsdp_resume_continues_as_if_never_interrupted(tmp_path):
    args = [
        *BASE,
        "--data",
        str(_data(tmp_path)),
        "--lora",
        "--batch-size",
        "2",
        "--save-steps",
        "2",
        "--eval-split",
        "5",
        "--eval-steps",
        "2",
        "--fsdp",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _torchrun(tmp_path, [*args, "--out", str(ref)])
    ckpt = ref / "checkpoints" / "step-2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    assert set(torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]) == set(
        load_file(str(ckpt / "trainable.safetensors"))
    )  # keyed by parameter name, every trained tensor
    # "killed" after the step-2 checkpoint: the run as it was then (metrics of steps 3-4 are dropped on resume)
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("step-4", "model", "converted", "loss.png"))
    proc, probe = _torchrun(tmp_path, ["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"])
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    # only rank 0 reads the checkpoint's tensors and optimizer state; rank 1 receives its shards
    reads = [json.loads((probe / f"rank{r}.json").read_text())["reads"] for r in (0, 1)]
    assert {"trainable.safetensors", "optimizer.pt"} <= set(reads[0])
    assert "trainable.safetensors" not in reads[1] and "optimizer.pt" not in reads[1]
    a, b = _rows(ref / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6), x["step"]
        assert y.get("eval_loss") == pytest.approx(x.get("eval_loss"), abs=1e-6), x["step"]
    wa, wb = _weights(ref), _weights(run)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_refuses_bitsandbytes_with_one_line():
    from edgeft.config import TrainConfig, resolve

    with pytest.raises(EdgeftError, match="cannot shard a bitsandbytes"):
        resolve(TrainConfig(model="tiny-llama", device="cpu", load_in_4bit=True, distributed="fsdp"))
    with pytest.raises(EdgeftError, match="cannot use --optim adamw_8bit"):
        resolve(TrainConfig(model="tiny-llama", device="cpu", optim="adamw_8bit", distributed="fsdp"))
    with pytest.raises(EdgeftError, match="distributed must be"):
        resolve(TrainConfig(model="tiny-llama", device="cpu", distributed="zero3"))


def test_strategy_choice():
    from edgeft.config import TrainConfig
    from edgeft.models import resolve_model
    from edgeft.training import fsdp

    cfg = TrainConfig(
        distributed="auto", load_in_4bit=False, load_in_8bit=False, optim="adamw", dtype="bf16", mode="full"
    )
    md = resolve_model("tiny-llama")
    n = fsdp._checkpoint_params(md)
    assert n is not None and n > 0
    # full fine-tuning in bf16: weights + gradient + DDP bucket (2 bytes each) + fp32 master and two fp32 AdamW
    # moments (12); LoRA: the weights
    assert fsdp.ddp_bytes_estimate(n, cfg) == 18 * n
    assert fsdp.ddp_bytes_estimate(n, cfg.replace(mode="lora")) == 2 * n
    assert fsdp.choose(cfg, md, 2, "cpu") == "ddp"  # gloo on CPU: DDP unless asked
    assert fsdp.choose(cfg, md, 1, "cuda") == "ddp"  # one process
    assert fsdp.choose(cfg.replace(distributed="fsdp"), md, 2, "cpu") == "fsdp"


def test_fsdp_qat_distilled_from_its_twin_equals_one_process(tmp_path):
    # edgeft's default QAT recipe: the no-QAT twin trains first (under FSDP2 too), then QAT starts from its weights
    # and distils KL(twin || QAT) with packaged prose mixed in; the teacher is sharded like the student (loaded by
    # rank 0 only: 3 models loaded, the twin, the QAT student and its teacher). The twins agree to fp32; the distilled
    # QAT runs only as closely as QAT lets any two summation orders agree (QAT_DISTILL: the KL is tiny, ~5e-3, and a
    # grid point flipped by a last-bit difference moves it)
    a, _ = _compare(tmp_path, ["--lora", "--qat", "int8-int4"], wtol=5e-2, loads=3, **QAT_DISTILL)
    b = _rows(tmp_path / "two" / "metrics.jsonl")
    assert all(r["distill_kl"] > 0 for r in a + b)
    assert [r["distill_kl"] for r in b] == pytest.approx([r["distill_kl"] for r in a], rel=QAT_DISTILL_KL)
    ta, tb = (
        _rows(tmp_path / "one" / "baseline" / "metrics.jsonl"),
        _rows(tmp_path / "two" / "baseline" / "metrics.jsonl"),
    )
    assert [r["loss"] for r in tb] == pytest.approx([r["loss"] for r in ta], rel=1e-5)  # the twins agree first


def test_fsdp_fused_distillation_from_a_sharded_teacher_equals_one_process(tmp_path):
    # the same recipe with the kernels: the QAT student's distillation takes the fused heads + KL kernel (its
    # PyTorch reference here, no Triton interpreter) although the teacher is sharded: its root is gathered for the
    # kernel. Same tolerances as the materialised test above.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    a, _ = _compare(
        tmp_path, ["--lora", "--qat", "int8-int4", "--kernels", "on"], wtol=5e-2, env=env, loads=3, **QAT_DISTILL
    )
    b = _rows(tmp_path / "two" / "metrics.jsonl")
    assert all(r["distill_kl"] > 0 for r in a + b)
    assert [r["distill_kl"] for r in b] == pytest.approx([r["distill_kl"] for r in a], rel=QAT_DISTILL_KL)
    for run in ("one", "two"):
        assert "distillation: fused heads + KL kernel" in (tmp_path / f"{run}.stderr").read_text(), run


def test_fsdp_bf16_full_finetuning_with_fp32_masters_equals_one_process_and_resumes(tmp_path):
    # lr 1e-5 is below half a bf16 step of most weights: they move only through the fp32 masters (train/
    # precision.py), here DTensors sharded like the bf16 weights. One process accumulates bf16 gradients where FSDP
    # reduces them in fp32, so AdamW's +-lr first steps differ on a few tiny gradients (as in the bf16 LoRA test);
    # the bf16 weights are their masters rounded stochastically with the same random bits in both (measured: 0.14%
    # of them one bf16 step apart after 4 steps), and the gradient norm, a bf16 number, may land one bf16 step apart
    a, _ = _compare(
        tmp_path,
        ["--full", "--dtype", "bf16", "--lr", "1e-5", "--save-steps", "2"],
        rel=1e-3,
        wtol=2e-3,
        grad_rel=2**-7,
    )
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    differ = sum(int((one[k] != two[k]).sum()) for k in one) / sum(t.numel() for t in one.values())
    assert differ < 0.01, differ  # shards drawing their own random bits: ~40% (4 steps of 1e-5 at |w| ~ 0.02)
    info = json.loads((tmp_path / "two" / "model" / "edgeft.json").read_text())
    assert info["precision"]["bf16_update"] == "master" and info["precision"]["master_tensors"] > 0
    assert info["precision"]["weights"] == "bf16"
    ckpt = tmp_path / "two" / "checkpoints" / "step-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert set(saved) == set(load_file(str(ckpt / "trainable.safetensors")))  # every weight, by name
    assert all(s["master"].dtype == torch.float32 for s in saved.values())  # gathered whole on rank 0
    # killed after step 2, resumed: the masters come back sharded and the run continues bit-exactly
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "two", run, ignore=shutil.ignore_patterns("step-4", "model", "converted", "loss.png"))
    proc, _ = _torchrun(tmp_path, ["train", "--out", str(run), "--resume", "--no-progress", "--threads", "1"])
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    ref, got = _rows(tmp_path / "two" / "metrics.jsonl"), _rows(run / "metrics.jsonl")
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    wa, wb = _weights(tmp_path / "two"), _weights(run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
