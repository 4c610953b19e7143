"""Device profiles, the fit check and regression checks against hand-computed numbers."""

import json

import pytest

from edgeft.devices import profiles, regression
from edgeft.errors import EdgeftError


def test_every_profile_is_consistent():
    assert {"pixel-8", "iphone-15-pro", "galaxy-s24", "raspberry-pi-5", "android-4gb"} <= set(profiles.PROFILES)
    for p in profiles.PROFILES.values():
        assert 0 < p.app_memory_gib < p.ram_gib and p.bandwidth_gbs > 0 and p.cpu_cores > 0
        assert 0 < p.efficiency[0] < p.efficiency[1] <= 1


def _fake_artifact(tmp_path, size, layers=30, kv_heads=3, head_dim=64, vocab=49152, hidden=576):
    art = tmp_path / "model.pte"
    art.write_bytes(b"\0" * size)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": layers,
                "num_attention_heads": 9,
                "num_key_value_heads": kv_heads,
                "head_dim": head_dim,
                "vocab_size": vocab,
                "hidden_size": hidden,
            }
        )
    )
    return art


def test_check_memory_and_speed_by_hand(tmp_path):
    art = _fake_artifact(tmp_path, 100 * 2**20)
    r = profiles.check(profiles.get_profile("pixel-8"), art, context=1024)
    kv = 2 * 30 * 3 * 64 * 1024 * 4  # fp32 cache in ExecuTorch
    assert r["kv_cache_mb"] == pytest.approx(kv / 2**20)
    act = 4 * (49152 + 8 * 576) * 2
    assert r["runtime_memory_mb"] == pytest.approx((100 * 2**20 + kv + act + profiles.RUNTIME_OVERHEAD_BYTES) / 2**20)
    per_token = 100 * 2**20 + kv / 2
    lo = 1 / (per_token / (68.3e9 * 0.25) + 30 * 0.1e-3)
    assert r["decode_tokens_per_s"][0] == pytest.approx(lo, rel=1e-3)
    assert r["fits"] and "fits on pixel-8" in r["verdict"]


def test_too_big_does_not_fit(tmp_path):
    art = _fake_artifact(tmp_path, 0)
    r = profiles.check(profiles.get_profile("android-4gb"), art, context=200_000)
    assert not r["fits"] and "does NOT fit" in r["verdict"]


def test_unknown_device_and_missing_artifact(tmp_path):
    with pytest.raises(EdgeftError, match="unknown device 'nokia-3310'"):
        profiles.get_profile("nokia-3310")
    with pytest.raises(EdgeftError, match="artifact not found"):
        profiles.check(profiles.get_profile("pixel-8"), tmp_path / "none.pte")


def _report(ppl=10.0, acc=0.5):
    return {"results": [{"variant": "qat", "runtime": "pte", "perplexity": ppl, "accuracy": acc, "size_mb": 3.0}]}


def test_regression_check_flags_drift_only():
    golden = regression.golden_from_report(_report())
    assert regression.check(_report(10.1, 0.52), golden) == []
    problems = regression.check(_report(10.5, 0.3), golden)
    assert len(problems) == 2 and problems[0].startswith("qat/pte/perplexity: 10.5 drifted from 10")
    missing = regression.check({"results": []}, golden)
    assert len(missing) == 3 and all("missing" in m for m in missing)


def test_bad_golden_files(tmp_path):
    p = tmp_path / "g.json"
    p.write_text('{"metrics": [{"variant": "qat", "runtime": "pte", "metric": "perplexity", "value": 1}]}')
    with pytest.raises(EdgeftError, match="rel_tol or abs_tol"):
        regression.load_golden(p)
    with pytest.raises(EdgeftError, match="not found"):
        regression.load_golden(tmp_path / "nope.json")


def test_pte_check_uses_the_kv_cache_its_program_holds(tmp_path):
    # edgeft's .pte allocates its cache at export (max_context_len; Gemma3's sliding layers as a shorter ring):
    # the export's manifest.json record is what the device must hold, not the uniform estimate at --context
    art = _fake_artifact(tmp_path, 100 * 2**20)
    ring = {
        "context_rows": 4096,
        "ring_rows": 1023,
        "ring_layers": 22,
        "layers": 26,
        "bytes": 76 * 2**20,
        "full_length_bytes": 208 * 2**20,
    }
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "gguf": {"path": str(tmp_path / "model-q4_0.gguf"), "bytes": 1},
                "pte": {"path": str(art), "bytes": 100 * 2**20, "kv_cache": ring},
            }
        )
    )
    r = profiles.check(profiles.get_profile("pixel-8"), art, context=1024)
    assert r["kv_cache_source"] == "program" and r["context"] == 4096
    assert r["kv_cache_mb"] == pytest.approx(76)
    act = 4 * (49152 + 8 * 576) * 2
    assert r["runtime_memory_mb"] == pytest.approx(
        (100 * 2**20 + 76 * 2**20 + act + profiles.RUNTIME_OVERHEAD_BYTES) / 2**20
    )
    other = tmp_path / "model-last.pte"  # no record of its own: the estimate
    other.write_bytes(b"\0")
    assert profiles.check(profiles.get_profile("pixel-8"), other, context=1024)["kv_cache_source"] == "estimate"
