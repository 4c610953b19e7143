"""Trainer features in-process on tiny-llama: exact resume with QAT (LoRA and full), evaluation, early stopping and
the best checkpoint, rotation, crash-safe writes, batching layouts, optimizers, schedules, LoRA options, reporting."""

import json
import math
from dataclasses import replace

import pytest
import torch

from edgeft.config import LoraSettings, TrainConfig, resolve
from edgeft.data import encode_dataset, load_conversations
from edgeft.errors import EdgeftError
from edgeft.models import load_model, resolve_model
from edgeft.training import (
    Checkpointing,
    CheckpointManager,
    Evaluation,
    Optimization,
    Reporting,
    TrainData,
    list_checkpoints,
    param_groups,
    prepare_model,
    train_loop,
)
from edgeft.training.optim import build_optimizer, lr_factor, warmup_steps_for


@pytest.fixture(scope="module")
def data():
    model_dir = resolve_model("tiny-llama")
    _, tok = load_model(model_dir)
    examples = encode_dataset(tok, load_conversations("builtin:tasks")[:96], max_length=128)
    return model_dir, tok, examples[:80], examples[80:]


def _cfg(**kw):
    return resolve(TrainConfig(model="tiny-llama", device="cpu", dtype="fp32", kernels="off", **kw))


OPT = Optimization(max_steps=5, batch_size=4, grad_accum=2, lr=2e-3, seed=3, warmup_ratio=0.0)


def _loop(
    model,
    tok,
    examples,
    opt=OPT,
    *,
    held=None,
    batching="padding_free",
    max_seq_length=None,
    metrics_path=None,
    **objects,
):
    objects.setdefault("reporting", Reporting(metrics_path=metrics_path, progress=False))
    return train_loop(model, TrainData(examples, tok.pad_token_id, held, batching, max_seq_length), opt, **objects)


def _rows(path):
    return [json.loads(line) for line in open(path)]


class _Crash(Exception):
    pass


@pytest.mark.parametrize("mode,qat", [("lora", "int8-int4"), ("full", None)])
def test_resume_is_exact(data, tmp_path, mode, qat):
    """Interrupted at step 2 (last checkpoint: step 1), rebuilt from scratch and resumed: same losses, same weights."""
    model_dir, tok, examples, _ = data
    cfg = _cfg(mode=mode, qat=qat, lr=2e-3, ptq=False)
    # small: under TRITON_INTERPRET the QAT fake-quant kernels run interpreted on CPU
    opt = replace(OPT, lr=cfg.optim.lr, optimizer="adamw", max_steps=3, batch_size=2, grad_accum=1)
    examples = examples[:16]

    def fresh():
        torch.manual_seed(cfg.optim.seed)
        return prepare_model(cfg, model_dir)[0]

    ref_model = fresh()
    _loop(ref_model, tok, examples, opt, metrics_path=tmp_path / "ref.jsonl")

    def crash(row):
        if row["step"] == 2:
            raise _Crash

    ckpt = CheckpointManager(tmp_path / "ck", fingerprint={"mode": mode})
    with pytest.raises(_Crash):
        _loop(
            fresh(),
            tok,
            examples,
            opt,
            metrics_path=tmp_path / "run.jsonl",
            checkpointing=Checkpointing(ckpt, 1),
            on_log=crash,
        )
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1]
    resumed = fresh()
    summary = _loop(
        resumed,
        tok,
        examples,
        opt,
        metrics_path=tmp_path / "run.jsonl",
        checkpointing=Checkpointing(ckpt, 1, resume=True),
    )
    assert summary["resumed_from"] == 1
    ref, got = _rows(tmp_path / "ref.jsonl"), _rows(tmp_path / "run.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], abs=1e-6)
    for (n, a), (_, b) in zip(ref_model.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    with pytest.raises(EdgeftError, match=rf"different configuration \(mode: '{mode}' -> 'x'\)"):
        CheckpointManager(tmp_path / "ck", fingerprint={"mode": "x"}).read_state(tmp_path / "ck" / "step-3")


def test_full_qat_checkpoint_tensors_round_trip(data):
    """Full fine-tuning under QAT: every weight of the fake-quantized model is saved and restored by name."""
    from edgeft.training.checkpoint import load_trainable, trainable_state

    model_dir, _, _, _ = data
    cfg = _cfg(mode="full", qat="int8-int4")
    torch.manual_seed(0)
    a, info = prepare_model(cfg, model_dir)
    assert info["qat"]["scheme"] == "int8-int4"
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    saved = trainable_state(a)
    assert set(saved) >= {n for n, p in a.named_parameters()}
    b, _ = prepare_model(cfg, model_dir)
    load_trainable(b, saved, "test")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_eval_early_stopping_keeps_and_restores_the_best(data, tmp_path):
    model_dir, tok, examples, held = data
    torch.manual_seed(0)
    model, _ = load_model(model_dir)
    snapshots = {}
    ckpt = CheckpointManager(tmp_path / "ck", keep=1)

    def snap(row):
        snapshots[row["step"]] = {n: p.detach().clone() for n, p in model.named_parameters()}

    # a threshold no later evaluation can beat: the first evaluation stays the best, patience 2 stops at step 3
    s = _loop(
        model,
        tok,
        examples,
        replace(OPT, max_steps=20),
        held=held,
        evaluation=Evaluation(steps=1, patience=2, threshold=100.0),
        checkpointing=Checkpointing(ckpt, 1),
        metrics_path=tmp_path / "m.jsonl",
        on_log=snap,
    )
    rows = _rows(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all("eval_loss" in r for r in rows)
    assert s["stopped_early"] and s["best_step"] == 1 and s["best_eval_loss"] == rows[0]["eval_loss"]
    assert [c for c, _ in list_checkpoints(tmp_path / "ck")] == [1, 3]  # newest (limit 1) plus the best
    for n, p in model.named_parameters():  # the model holds the best (step 1) weights, not the last
        torch.testing.assert_close(p, snapshots[1][n], rtol=0, atol=0, msg=n)
    assert not torch.equal(snapshots[3]["model.norm.weight"], snapshots[1]["model.norm.weight"])


def test_eval_loss_is_the_mean_over_held_out_tokens(data):
    from edgeft.data import Batcher, collate
    from edgeft.training import evaluate_loss, lm_loss_sum

    model_dir, tok, _, held = data
    model, _ = load_model(model_dir)
    got = evaluate_loss(model, Batcher(held, "padding_free", tok.pad_token_id), batch_size=5)
    with torch.no_grad():
        parts = [lm_loss_sum(model, collate([ex], tok.pad_token_id)) for ex in held]
    assert got == pytest.approx(float(sum(s for s, _ in parts)) / float(sum(n for _, n in parts)), rel=1e-5)


def test_checkpoint_writes_are_atomic(data, tmp_path, monkeypatch):
    model_dir, tok, examples, _ = data
    model, _ = load_model(model_dir)
    ckpt = CheckpointManager(tmp_path / "ck")
    import edgeft.training.checkpoint as ck

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise _Crash  # the process "dies" halfway through writing step 2
        return real_save(obj, f, *a, **k)

    _loop(model, tok, examples, replace(OPT, max_steps=1), checkpointing=Checkpointing(ckpt, 1))
    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(_Crash):
        _loop(model, tok, examples, replace(OPT, max_steps=2), checkpointing=Checkpointing(ckpt, 1, resume=True))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name != "step-1"]
    (tmp_path / "ck" / ".step-7.tmp-abc").mkdir()  # what a SIGKILL mid-write leaves
    (tmp_path / "ck" / "step-9").mkdir()  # a directory without state.json is not a checkpoint
    assert ckpt.latest().name == "step-1"
    _loop(model, tok, examples, replace(OPT, max_steps=2), checkpointing=Checkpointing(ckpt, 1, resume=True))
    assert not (tmp_path / "ck" / ".step-7.tmp-abc").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [1, 2]


def test_padded_and_padding_free_train_identically_and_packing_runs(data, tmp_path):
    model_dir, tok, examples, _ = data
    curves = {}
    for layout in ("padded", "padding_free", "packed"):
        torch.manual_seed(0)
        model, _ = load_model(model_dir)
        s = _loop(
            model,
            tok,
            examples,
            replace(OPT, max_steps=3),
            batching=layout,
            max_seq_length=128,
            metrics_path=tmp_path / f"{layout}.jsonl",
        )
        curves[layout] = [r["loss"] for r in _rows(tmp_path / f"{layout}.jsonl")]
        if layout == "packed":
            assert 0.5 < s["packing_efficiency"] <= 1.0
    assert curves["padding_free"] == pytest.approx(curves["padded"], rel=1e-5)
    assert all(math.isfinite(x) for x in curves["packed"])


@pytest.mark.parametrize("optim", ["adamw", "sgd", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_optimizers_step_and_resume_state(optim):
    if optim != "adamw" and optim != "sgd":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4))
    opt = build_optimizer(net, 1e-2, 0.1, optim)
    x, y = torch.randn(32, 64), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay; norms and biases don't
    again = build_optimizer(net, 1e-2, 0.1, optim)
    again.load_state_dict(opt.state_dict())  # what a checkpoint does
    assert len(again.state) == len(opt.state)


def test_param_groups_and_embedding_lr(data):
    model_dir, _, _, _ = data
    cfg = _cfg(lora=LoraSettings(target_modules="all-linear,lm_head,embed_tokens"), embedding_lr=1e-5)
    model, _ = prepare_model(cfg, model_dir)
    groups = param_groups(model, 2e-4, 0.01, embedding_lr=1e-5)
    emb = [n for g in groups if g["lr"] == 1e-5 for n in g["names"]]
    body = [n for g in groups if g["lr"] == 2e-4 for n in g["names"]]
    assert emb and all("embed_tokens" in n or "lm_head" in n for n in emb)
    assert any("embed_tokens.lora_embedding_A" in n for n in emb) and any("lm_head.lora_A" in n for n in emb)
    assert body and not any("embed_tokens" in n or "lm_head" in n for n in body)
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim < 2 for p in g["params"]))


def test_warmup_steps_override_the_ratio():
    assert warmup_steps_for(100, 0.1, None) == 10 and warmup_steps_for(100, 0.1, 3) == 3
    assert lr_factor(0, 100, 3, "constant") == pytest.approx(1 / 3) and lr_factor(3, 100, 3, "constant") == 1.0


def test_lora_options(data, tmp_path):
    model_dir, tok, examples, _ = data
    cfg = _cfg(lora=LoraSettings(r=4, alpha=8, use_rslora=True, bias="lora_only", modules_to_save=["lm_head"]))
    model, info = prepare_model(cfg, model_dir)
    lin = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lin.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert model.peft_config["default"].bias == "lora_only"
    assert any("lm_head.modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    assert info["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # continue from a saved adapter: its weights, trainable
    _loop(model, tok, examples, replace(OPT, max_steps=1, lr=1e-2))
    model.save_pretrained(tmp_path / "adapter")
    again, info2 = prepare_model(cfg.replace(adapter=str(tmp_path / "adapter")), model_dir)
    assert info2["adapter_from"] == str(tmp_path / "adapter")
    a = {n: p for n, p in model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in again.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and b[n].requires_grad for n in a)
    with pytest.raises(EdgeftError, match="no adapter_config.json"):
        prepare_model(cfg.replace(adapter=str(tmp_path)), model_dir)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_lora_trains(data, bits):
    """QLoRA: NF4 base with double quantization (bitsandbytes), LoRA adapters in float; and 8-bit loading.
    bitsandbytes 0.50 runs both on CPU too; a build without this device's kernels gives one clear error."""
    bnb = pytest.importorskip("bitsandbytes")
    model_dir, tok, examples, _ = data
    cfg = _cfg(**{f"load_in_{bits}bit": True})
    try:
        model, info = prepare_model(cfg, model_dir)
    except EdgeftError as e:
        assert f"{bits}-bit loading failed" in str(e)
        pytest.skip(str(e))
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    if bits == 4:
        assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
        assert q.weight.quant_state.nested  # double quantization
        assert info["quantized_base"] == "nf4"
    else:
        assert isinstance(q, bnb.nn.Linear8bitLt) and info["quantized_base"] == "int8"
    s = _loop(model, tok, examples, replace(OPT, max_steps=2, batch_size=2, grad_accum=1))
    assert math.isfinite(s["final_loss"])


def test_tensorboard_logs_the_curve(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, tok, examples, held = data
    model, _ = load_model(model_dir)
    _loop(
        model,
        tok,
        examples,
        replace(OPT, max_steps=3),
        held=held[:4],
        evaluation=Evaluation(steps=3),
        reporting=Reporting(
            metrics_path=tmp_path / "m.jsonl", progress=False, report_to=["tensorboard"], log_dir=tmp_path
        ),
    )
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([r["loss"] for r in _rows(tmp_path / "m.jsonl")], rel=1e-6)
    assert len(acc.Scalars("eval/loss")) == 1
    with pytest.raises(EdgeftError, match="unknown --report-to 'mlflow'"):
        _cfg(report_to=["mlflow"])


def test_checkpoint_lora_weights_of_a_qat_prepared_model(data, tmp_path):
    """The checkpoint's adapter/ is a complete PEFT adapter even while QAT has replaced the LoRA layers."""
    from safetensors.torch import load_file

    from edgeft.training import save_adapter

    model_dir, _, _, _ = data
    model, _ = prepare_model(_cfg(qat="int8-int4"), model_dir)
    layer = type(model.base_model.model.model.layers[0].self_attn.q_proj)
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    live = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(live) > 0
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj) is layer  # QAT layers are back


def test_checkpoint_from_before_a_config_key_resumes_while_the_key_is_at_its_default(tmp_path):
    """A key added to TrainConfig after a checkpoint was written (its fingerprint lacks it) is no difference while
    the current run leaves it at its default; set otherwise, it is one. Nested keys (lora.*) likewise."""
    import json

    from edgeft.config import TrainConfig, identity, identity_defaults
    from edgeft.training.checkpoint import fingerprint_diff

    current = json.loads(json.dumps(identity(TrainConfig())))
    old = json.loads(json.dumps(current))
    del old["qat_distill_positions"], old["lora"]["use_rslora"]  # keys of later sessions
    d = identity_defaults()
    assert fingerprint_diff(old, current, d) == []
    assert fingerprint_diff(old, current) != []  # without the defaults: the refusal old runs met
    changed = json.loads(json.dumps(identity(TrainConfig().replace(qat_distill_positions="targets"))))
    assert fingerprint_diff(old, changed, d) == ["qat_distill_positions: 'all' -> 'targets'"]
    ckpt = tmp_path / "ck" / "step-1"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "fingerprint": old}))
    CheckpointManager(tmp_path / "ck", fingerprint=current, defaults=d).read_state(ckpt)
    with pytest.raises(EdgeftError, match="qat_distill_positions: 'all' -> 'targets'"):
        CheckpointManager(tmp_path / "ck", fingerprint=changed, defaults=d).read_state(ckpt)
