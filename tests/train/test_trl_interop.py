"""A model prepared by edgeft (LoRA + fused kernels + QAT fake quantization) trains in TRL's SFTTrainer on edgeft's
encoded data, and TRL's first loss equals edgeft's loss on the same batch."""

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_sft_trainer_trains_an_edgeft_prepared_model(tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from edgeft.config import TrainConfig, resolve
    from edgeft.data import collate, encode_dataset, load_conversations
    from edgeft.models import resolve_model
    from edgeft.training import lm_loss_sum, prepare_model

    model_dir = resolve_model("tiny-llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    examples = encode_dataset(tok, load_conversations("builtin:tasks")[:2], 128)
    cfg = resolve(
        TrainConfig(model="tiny-llama", device="cpu", dtype="fp32", mode="lora", kernels="on", qat="int8-int4")
    )
    torch.manual_seed(0)
    model, info = prepare_model(cfg, model_dir)
    assert info["kernels"] and info["qat"]["scheme"] == "int8-int4"
    with torch.no_grad():
        s, n = lm_loss_sum(model, collate(examples, tok.pad_token_id))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    # edgeft's labels become TRL's completion mask: TRL trains on exactly the tokens edgeft would
    ds = datasets.Dataset.from_list(
        [{"input_ids": ex["input_ids"], "completion_mask": [int(l != -100) for l in ex["labels"]]} for ex in examples]
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        completion_only_loss=True,
        max_length=None,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
    )  # fp32: see the report on CPU bf16 autocast
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    first = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    assert first == pytest.approx(float(s) / float(n), rel=1e-3)
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert any("lora_B" in k for k in changed)  # B starts at zero, so one step moves B (A gets no gradient yet)
