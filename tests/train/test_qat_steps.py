"""``qat_max_steps``: the QAT run's own number of steps (the twin trains ``max_steps``), and runs saved before the
key existed still resume."""

from __future__ import annotations

import json

import pytest
import yaml

from edgeft.config import TrainConfig, config_diff, from_dict, identity, load_yaml, resolve
from edgeft.errors import EdgeftError
from edgeft.training.checkpoint import fingerprint_diff


def test_config_default_validation_and_identity():
    cfg = resolve(TrainConfig(model="tiny-llama", qat="int8-int4", max_steps=5))
    assert cfg.qat.max_steps is None  # the QAT run trains max_steps (filled once epochs are known)
    assert "qat_max_steps" not in identity(cfg)
    assert "qat_max_steps" not in identity(cfg.replace(qat_max_steps=5))  # the default, spelled out
    assert identity(cfg.replace(qat_max_steps=15))["qat_max_steps"] == 15
    with pytest.raises(EdgeftError, match="at least 1"):
        resolve(TrainConfig(model="tiny-llama", qat="int8-int4", qat_max_steps=0))
    with pytest.raises(EdgeftError, match="needs --qat"):
        resolve(TrainConfig(model="tiny-llama", qat_max_steps=10))


def test_a_config_saved_before_the_key_matches_its_resolved_default():
    new = resolve(TrainConfig(model="tiny-llama", qat="int8-int4", max_steps=7)).replace(qat_max_steps=7)
    old = new.to_flat()  # config.yaml before sections: flat keys, and without this one
    del old["qat_max_steps"]
    saved = resolve(from_dict(old))
    assert config_diff(saved, new) == []
    assert fingerprint_diff(identity(saved), identity(new)) == []  # checkpoints' state.json fingerprint
    assert config_diff(saved, new.replace(qat_max_steps=21)) == ["qat_max_steps: None -> 21"]


def test_cli_flag_reaches_the_config():
    from edgeft.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--qat", "int8-int4", "--max-steps", "4", "--qat-max-steps", "12"])
    cfg = _train_config(args)
    assert (cfg.optim.max_steps, cfg.qat.max_steps) == (4, 12)


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_qat_run_trains_its_own_steps_and_an_old_run_resumes(tmp_path):
    import edgeft

    out = tmp_path / "r"
    cfg = TrainConfig(
        model="tiny-llama",
        data="builtin:tasks",
        mode="lora",
        qat="int8-int4",
        max_steps=2,
        qat_max_steps=3,
        batch_size=2,
        lr=1e-3,
        out=str(out),
        progress=False,
        save_steps=1,
        threads=1,
    )
    run = edgeft.train(cfg)
    assert _steps(run / "baseline" / "metrics.jsonl") == [1, 2]
    assert _steps(run / "metrics.jsonl") == [1, 2, 3]
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] < lrs[-2]  # the QAT run's schedule decays over its own 3 steps
    assert yaml.safe_load((run / "config.yaml").read_text())["qat"]["max_steps"] == 3

    # a run from before the key (QAT as long as the twin): its config.yaml and checkpoint fingerprints lack it
    old = tmp_path / "old"
    run = edgeft.train(cfg.replace(qat_max_steps=None, out=str(old)))
    saved = load_yaml(old / "config.yaml").to_flat()  # written as it was before sections: flat keys
    assert saved["qat_max_steps"] == 2
    del saved["qat_max_steps"]
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    for state in old.glob("**/checkpoints/step-*/state.json"):
        st = json.loads(state.read_text())
        st["fingerprint"].pop("qat_max_steps", None)
        state.write_text(json.dumps(st))
    (old / "model" / "edgeft.json").unlink()  # the QAT run unfinished: resuming reads its newest checkpoint
    resumed = cfg.replace(qat_max_steps=None, out=str(old), resume=True)
    assert edgeft.train(resumed) == old
    assert (old / "model" / "edgeft.json").exists()
    assert _steps(old / "metrics.jsonl") == [1, 2]
    # asking an old run for other QAT steps is another config
    (old / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(EdgeftError, match="qat_max_steps"):
        edgeft.train(resumed.replace(qat_max_steps=5))
