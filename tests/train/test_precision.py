"""bf16 training loses no update (edgeft/training/precision.py): fp32 master weights behind every optimizer, for every
trainable tensor (full fine-tuning, LoRA adapters, modules_to_save, learned QAT scales), checkpointed with the
optimizer state so that a resumed run continues bit-exactly; each bf16 weight is its master rounded stochastically,
so the bf16 forward follows the masters in expectation. The FSDP2 cases are in test_fsdp.py."""

import pytest
import torch
from torch import nn

from edgeft.config import LoraSettings, TrainConfig, resolve
from edgeft.data import encode_dataset, load_conversations
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model
from edgeft.training import (
    Checkpointing,
    CheckpointManager,
    Optimization,
    Reporting,
    TrainData,
    list_checkpoints,
    precision,
    prepare_model,
    train_loop,
)
from edgeft.training.optim import build_optimizer, build_scheduler, precision_record
from edgeft.training.precision import MasterWeights, stochastic_round_

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2^-7: the spacing of bf16 numbers in [1, 2)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (towards larger magnitudes)."""
    return BF16_EPS * torch.exp2(torch.floor(torch.log2(x.abs())))


def _trajectories(update: str, optim: str, lr: float, steps: int = 20):
    """A bf16 linear layer and its fp32 reference fed the same gradients (the reference's, rounded to bf16 for the
    bf16 layer, as a bf16 backward hands them over), each with edgeft's optimizer and schedule. Weights |w| in
    [0.5, 1): the bf16 spacing there is 2^-8, so every step below is under half of it."""
    torch.manual_seed(0)
    w0 = ((torch.rand(64, 32) * 0.5 + 0.5) * torch.randn(64, 32).sign()).bfloat16().float()  # exact in bf16
    x, y = torch.randn(256, 32), torch.randn(256, 64)
    ref = nn.Linear(32, 64, bias=False)
    low = nn.Linear(32, 64, bias=False).bfloat16()
    with torch.no_grad():
        ref.weight.copy_(w0)
        low.weight.copy_(w0)
    opt_ref, opt = build_optimizer(ref, lr, 0.0, optim), build_optimizer(low, lr, 0.0, optim, bf16_update=update)
    scheds = [build_scheduler(o, steps, 2, "cosine") for o in (opt_ref, opt)]
    travelled = torch.zeros_like(w0)  # sum over steps of |reference step|
    for _ in range(steps):
        ((ref(x) - y) ** 2).mean().backward()
        low.weight.grad = ref.weight.grad.bfloat16()
        before = ref.weight.detach().clone()
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad(set_to_none=True)
        for s in scheds:
            s.step()
        step = (ref.weight.detach() - before).abs()
        assert float(step.max()) < 0.5 * 2**-8  # every step is below half a bf16 step of every weight
        travelled += step
    return w0, ref.weight.detach(), low.weight.detach().float(), travelled, opt


@pytest.mark.parametrize(
    "optim,lr,steps,update",
    [
        ("adamw", 1e-3, 20, "master"),
        ("sgd", 2.5e-2, 40, "master"),
        ("adamw", 1e-3, 20, "master-nearest"),
        ("adamw_8bit", 1e-3, 20, "master"),
        ("paged_adamw", 1e-3, 20, "master"),
    ],
)
def test_updates_below_half_a_bf16_step_are_not_lost(optim, lr, steps, update):
    if optim not in ("adamw", "sgd"):
        pytest.importorskip("bitsandbytes")  # behind the masters it updates fp32 tensors (8-bit state from 4096)
    w0, ref, pure, travelled, opt = _trajectories("pure", optim, lr, steps)
    assert float((ref != w0).float().mean()) == 1.0  # the fp32 reference moves every weight ...
    assert float((ref - w0).abs().mean()) > 2 * 2**-8  # ... by more than two bf16 steps on average
    # the old update: bf16 weight += step rounds back to the same weight (except a few just above a power of 2,
    # where the spacing below is half as large)
    assert float((pure != w0).float().mean()) < 0.02
    assert precision_record(opt, "bf16")["bf16_update"] == "pure"

    w0, ref, got, travelled, opt = _trajectories(update, optim, lr, steps)
    assert isinstance(opt, MasterWeights)
    rec = precision_record(opt, "bf16")
    assert rec["bf16_update"] == "master"
    assert rec["rounding"] == ("nearest" if update == "master-nearest" else "stochastic")
    assert float((got != w0).float().mean()) > 0.95
    # the master follows the reference up to the gradients' bf16 rounding (relative 2^-9 each; AdamW's normalised
    # step and SGD's step move by at most twice that relatively, bounded here by 2^-7 of the distance travelled),
    # and the bf16 weight is the master rounded to nearest (half a bf16 step more) or stochastically (one of the
    # two bf16 neighbours: a step more)
    tol = _ulp(ref) / (2 if update == "master-nearest" else 1) + 2**-7 * travelled
    assert bool(((got - ref).abs() <= tol).all()), float(((got - ref).abs() - tol).max())
    master = opt.state[next(iter(opt.state))]["master"]
    assert master.dtype == torch.float32
    assert float((master - ref).abs().max()) <= float((2**-7 * travelled).max())


def test_masters_round_trip_through_state_dict_as_fp32():
    _, _, _, _, opt = _trajectories("master", "adamw", 1e-3, steps=3)
    sd = opt.state_dict()
    st = sd["state"][0]
    assert set(st) == {"master", "step", "exp_avg", "exp_avg_sq"}
    assert all(st[k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    layer = nn.Linear(32, 64, bias=False).bfloat16()
    again = build_optimizer(layer, 1e-3, 0.0, "adamw")
    again.load_state_dict(sd)  # torch's own load would cast the master to bf16
    got = again.state[layer.weight]
    for k in ("master", "exp_avg", "exp_avg_sq"):
        assert got[k].dtype == torch.float32 and torch.equal(got[k], st[k]), k
    # the weight is its master rounded as the saved step rounded it (the same random bits)
    assert torch.equal(layer.weight.float(), _trajectories("master", "adamw", 1e-3, steps=3)[2])
    assert sd["param_groups"][0]["rounding_step"] == 3 and again.param_groups[0]["rounding_step"] == 3
    # a checkpoint from before the masters: they start from the (loaded) weights
    old = {"state": {0: {k: v for k, v in st.items() if k != "master"}}, "param_groups": sd["param_groups"]}
    fresh = nn.Linear(32, 64, bias=False).bfloat16()
    third = build_optimizer(fresh, 1e-3, 0.0, "adamw")
    third.load_state_dict(old)
    assert torch.equal(third.state[fresh.weight]["master"], fresh.weight.float())


def _neighbours(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 numbers just below and just above ``m`` (fp32), as fp32 (equal where ``m`` is a bf16 number)."""
    bits = m.view(torch.int32)
    down = (bits & -65536).view(torch.float32)  # towards zero
    up = ((bits & -65536) + 65536 * ((bits & 65535) != 0).to(torch.int32)).view(torch.float32)  # from zero
    return torch.minimum(down, up), torch.maximum(down, up)


def test_stochastic_rounding_is_unbiased_and_a_shard_rounds_as_the_whole(monkeypatch):
    monkeypatch.setattr(precision, "ROUND_CHUNK", 1000)  # several random streams, shard edges inside them
    torch.manual_seed(0)
    m = torch.randn(37, 101) * 0.02
    whole = torch.empty(m.shape, dtype=torch.bfloat16)
    stochastic_round_(whole, m, 1, 5, 3)
    lo, hi = _neighbours(m)
    assert bool(((whole.float() == lo) | (whole.float() == hi)).all())
    assert not torch.equal(whole, m.bfloat16())  # not simply to nearest
    rows = [0, 9, 19, 28, 37]  # as FSDP shards rows: each block rounds as it does inside the whole tensor
    for a, b in zip(rows, rows[1:]):
        part = torch.empty((b - a, 101), dtype=torch.bfloat16)
        stochastic_round_(part, m[a:b].contiguous(), 1, 5, 3, offset=a * 101, total=m.numel())
        assert torch.equal(part, whole[a:b]), (a, b)
    other = torch.empty_like(whole)
    for key in [(2, 5, 3), (1, 6, 3), (1, 5, 4)]:  # another seed, step or tensor: other random bits
        stochastic_round_(other, m, *key)
        assert not torch.equal(other, whole), key
    # unbiased: P(up) = (m - lo) / (hi - lo), so over k draws the mean is m within the binomial noise
    k, acc = 400, torch.zeros_like(m, dtype=torch.float64)
    for step in range(k):
        stochastic_round_(other, m, 1, step, 3)
        acc += other.double()
    q = ((m - lo) / (hi - lo)).double()
    keep = (q > 0.05) & (q < 0.95)
    z = ((acc / k - m.double()) / ((hi - lo).double() * (q * (1 - q) / k).sqrt()))[keep]
    assert 0.9 < float(z.pow(2).mean().sqrt()) < 1.1 and abs(float(z.mean())) < 0.1, (z.pow(2).mean(), z.mean())


@pytest.mark.parametrize("update", ["master", "master-nearest"])
def test_the_bf16_forward_follows_the_masters_in_expectation(update):
    """AdamW steps of 1e-4 on weights whose bf16 step is 2^-8 (|w| in [0.5, 1)): ten steps stay below half a bf16
    step. Rounded to nearest, the bf16 weights never move and the forward stays the starting one while the masters
    move; rounded stochastically, the bf16 weights move with the masters on average, step after step, and the
    layer's output averaged over roundings is the masters' output."""
    torch.manual_seed(0)
    w0 = ((torch.rand(128, 64) * 0.5 + 0.5) * torch.randn(128, 64).sign()).bfloat16().float()
    x, y = torch.randn(512, 64), torch.randn(512, 128)
    ref, low = nn.Linear(64, 128, bias=False), nn.Linear(64, 128, bias=False).bfloat16()
    with torch.no_grad():
        ref.weight.copy_(w0)
        low.weight.copy_(w0)
    opt_ref, opt = build_optimizer(ref, 1e-4, 0.0), build_optimizer(low, 1e-4, 0.0, bf16_update=update, seed=7)
    for step in range(10):
        ((ref(x) - y) ** 2).mean().backward()
        low.weight.grad = ref.weight.grad.bfloat16()
        for o in (opt_ref, opt):
            o.step()
            o.zero_grad(set_to_none=True)
        path = ref.weight.detach() - w0  # the fp32 path so far: below half a bf16 step everywhere
        assert float(path.abs().max()) < 2**-9
        along = float(((low.weight.detach().float() - w0) * path.sign()).mean()) / float(path.abs().mean())
        if update == "master-nearest":
            assert along < 0.03  # hardly moved (only weights just above 0.5, where the bf16 step below is 2^-9)
        elif step >= 2:  # the bf16 weights' mean move along the path is the path's (noise: 2-7% here)
            assert 0.8 < along < 1.2, (step, along)
    master = opt.state[low.weight]["master"]
    draw = torch.empty_like(low.weight)
    outs = []
    for k in range(200):
        stochastic_round_(draw, master, 7, 1000 + k, 0)
        outs.append(x @ draw.float().T)
    outs = torch.stack(outs)
    want = x @ master.T
    z = (outs.mean(0) - want) / (outs.std(0) / len(outs) ** 0.5)  # in units of the mean's noise over roundings
    assert float(z.pow(2).mean().sqrt()) < 1.2, float(z.pow(2).mean().sqrt())
    nearest = (x @ master.bfloat16().float().T - want) / outs.std(0)  # rounding to nearest: biased
    assert float(nearest.abs().mean()) > 0.1, float(nearest.abs().mean())


def test_fp32_runs_get_the_plain_optimizer():
    opt = build_optimizer(nn.Linear(8, 8), 1e-3, 0.0, "adamw")
    assert type(opt) is torch.optim.AdamW
    assert precision_record(opt, "fp32")["bf16_update"] == "fp32"


def test_bad_settings_are_one_clear_error():
    with pytest.raises(EdgeftError, match="bf16_update must be one of"):
        build_optimizer(nn.Linear(4, 4).bfloat16(), 1e-3, 0.0, "adamw", bf16_update="kahan")


# --- on a model, through the training loop ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    model_dir = resolve_model("tiny-llama")
    _, tok = load_model(model_dir)
    examples = encode_dataset(tok, load_conversations("builtin:tasks")[:32], max_length=128)
    return model_dir, tok, examples


def _cfg(**kw):
    return resolve(TrainConfig(model="tiny-llama", device="cpu", kernels="off", ptq=False, **kw))


def _train(cfg, data, update="master", metrics_path=None, checkpointing=Checkpointing(), on_log=None, **opt):
    """``opt``: Optimization fields over this file's defaults."""
    model_dir, tok, examples = data
    torch.manual_seed(cfg.optim.seed)
    model, _ = prepare_model(cfg, model_dir)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = dict(
        max_steps=4,
        batch_size=4,
        grad_accum=1,
        lr=cfg.optim.lr,
        seed=3,
        warmup_ratio=0.0,
        schedule="constant",
        bf16_update=update,
        scale_lr=cfg.qat.scale_lr,
    )
    args.update(opt)
    summary = train_loop(
        model,
        TrainData(examples, tok.pad_token_id),
        Optimization(**args),
        checkpointing=checkpointing,
        reporting=Reporting(metrics_path=metrics_path, progress=False),
        on_log=on_log,
    )
    return model, start, summary


def _moved(model, start, pick) -> float:
    """Share of the picked trainable entries that changed."""
    changed = total = 0
    for n, p in model.named_parameters():
        if n in start and pick(n):
            changed += int((p.detach() != start[n]).sum())
            total += p.numel()
    assert total, "nothing picked"
    return changed / total


def test_bf16_full_finetuning_moves_the_weights_fp32_moves(data):
    # lr 1e-5 is below half a bf16 step of almost every weight of this model (|w| ~ 0.02: step 1.2e-4 at 0.02)
    kw = dict(mode="full", lr=1e-5)
    fp32, s32, _ = _train(_cfg(dtype="fp32", **kw), data)
    pure, s_pure, sum_pure = _train(_cfg(dtype="bf16", **kw), data, update="pure")
    bf16, s16, summary = _train(_cfg(dtype="bf16", **kw), data)
    assert summary["precision"]["bf16_update"] == "master" and summary["precision"]["dtype"] == "bf16"
    assert sum_pure["precision"]["bf16_update"] == "pure"
    matrices = lambda n: n.endswith("proj.weight")  # noqa: E731
    assert _moved(fp32, s32, matrices) > 0.99
    # a bf16 weight shows a change where its master's path crosses a rounding boundary: the most it can show is
    # where the fp32 run's weights, rounded to bf16, changed ("visible"). The old update shows a third of that (the
    # smallest weights, whose bf16 step is below lr), the masters show almost all of it (bf16 forward/backward
    # rounding flips the sign of some small gradients, which AdamW turns into +-lr steps of other weights)
    visible = agree = agree_pure = 0
    total = 0
    for (n, a), (_, b), (_, c) in zip(fp32.named_parameters(), bf16.named_parameters(), pure.named_parameters()):
        if matrices(n):
            r = a.detach().bfloat16()
            v = r != s32[n].bfloat16()
            visible, total = visible + int(v.sum()), total + v.numel()
            agree += int(((b.detach() == r) & v).sum())
            agree_pure += int(((c.detach() == r) & v).sum())
    visible_share = visible / total
    assert _moved(bf16, s16, matrices) > 0.7 * visible_share  # measured 0.83 on an AMD EPYC (AVX2)
    assert _moved(pure, s_pure, matrices) < 0.5 * visible_share  # measured 0.35
    # and to the values the fp32 run's weights round to (measured 57% of the visible changes, the old update 14%)
    assert agree / visible > 0.4 and agree > 3 * agree_pure, (agree / visible, agree_pure / visible)


def test_lora_adapters_and_modules_to_save_all_train_in_bf16(data):
    cfg = _cfg(dtype="bf16", mode="lora", lr=1e-5, lora=LoraSettings(r=4, modules_to_save=["lm_head"]))
    model, start, summary = _train(cfg, data)
    rec = summary["precision"]
    assert rec["bf16_update"] == "master" and rec["dtype"] == "bf16+fp32"
    saved = [n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    adapters = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert saved and adapters
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.bfloat16 for n in saved)  # the copies stay bf16 for the forward ...
    assert all(params[n].dtype == torch.float32 for n in adapters)  # peft's adapters are fp32: their own masters
    assert rec["master_tensors"] == len(saved)  # ... and only they get fp32 masters
    assert _moved(model, start, lambda n: "modules_to_save" in n) > 0.5
    assert _moved(model, start, lambda n: "lora_B" in n) > 0.99


def test_learned_qat_scales_train_beside_bf16_weights(data):
    cfg = _cfg(dtype="bf16", mode="full", lr=1e-4, qat="int8-int4", qat_weight_scale="learned", qat_scale_lr=1e-3)
    model_dir, tok, examples = data
    short = sorted(examples, key=lambda e: len(e["input_ids"]))[:4]  # the fake-quant kernels run interpreted here
    model, start, summary = _train(cfg, (model_dir, tok, short), max_steps=2, batch_size=2)
    scales = [n for n in start if n.endswith("weight_fake_quantizer.log_scale")]
    assert scales and all(dict(model.named_parameters())[n].dtype == torch.float32 for n in scales)
    assert _moved(model, start, lambda n: n.endswith("log_scale")) > 0.5
    assert _moved(model, start, lambda n: n.endswith("proj.weight")) > 0.5
    assert summary["precision"]["bf16_update"] == "master"


class _Crash(Exception):
    pass


def test_bf16_resume_continues_bit_exactly(data, tmp_path):
    """Killed after step 2 (checkpoint at 2), rebuilt and resumed: the same losses and the same bf16 weights as a
    run never interrupted, bit for bit: the checkpoint holds the fp32 masters, not only their bf16 rounding."""
    cfg = _cfg(dtype="bf16", mode="full", lr=1e-5)
    # a schedule: the checkpoint must hold the lr the scheduler set for the next step
    kw = dict(max_steps=4, batch_size=2, schedule="cosine", warmup_ratio=0.25)
    ref, _, _ = _train(cfg, data, metrics_path=tmp_path / "ref.jsonl", **kw)

    def crash(row):
        if row["step"] == 3:
            raise _Crash

    ckpt = CheckpointManager(tmp_path / "ck")
    with pytest.raises(_Crash):
        _train(cfg, data, metrics_path=tmp_path / "run.jsonl", checkpointing=Checkpointing(ckpt, 2), on_log=crash, **kw)
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [2]
    saved = torch.load(tmp_path / "ck" / "step-2" / "optimizer.pt", weights_only=True)
    assert all(s["master"].dtype == torch.float32 for s in saved["state"].values())
    resumed, _, summary = _train(
        cfg, data, metrics_path=tmp_path / "run.jsonl", checkpointing=Checkpointing(ckpt, 2, resume=True), **kw
    )
    assert summary["resumed_from"] == 2
    import json

    rows = [[json.loads(line)["loss"] for line in open(tmp_path / f)] for f in ("ref.jsonl", "run.jsonl")]
    assert rows[0] == rows[1]
    for (n, a), (_, b) in zip(ref.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_the_run_records_its_update(data, tmp_path):
    """edgeft.json says how the weights were updated; the run saves the bf16 weights its forward trained."""
    import json

    from safetensors.torch import load_file

    from edgeft.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                "tiny-llama",
                "--full",
                "--dtype",
                "bf16",
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--no-progress",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--kernels",
                "off",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rec = json.loads((out / "model" / "edgeft.json").read_text())["precision"]
    assert rec["bf16_update"] == "master" and rec["optimizer"] == "AdamW" and rec["weights"] == "bf16"
    got = load_file(str(out / "model" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in got.values())


def test_keep_masters_ends_with_every_update_in_fp32(data):
    """Optimization(keep_masters=True): the model leaves train_loop with its fp32 masters as weights: every update,
    also those that did not cross half a bf16 step (one step at lr 2e-5 moves every master, few bf16 weights)."""
    cfg = _cfg(dtype="bf16", mode="full", lr=2e-5)
    model, start, summary = _train(cfg, data, max_steps=1, batch_size=2, keep_masters=True)
    assert summary["precision"]["weights"] == "fp32 masters"
    mats = {n: p.detach() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n = sum(p.numel() for p in mats.values())
    moved = sum(int((p != start[k].float()).sum()) for k, p in mats.items()) / n
    visible = sum(int((p.bfloat16() != start[k]).sum()) for k, p in mats.items()) / n
    assert moved > 0.99 and visible < 0.5, (moved, visible)  # what the bf16 weights show: a fraction
