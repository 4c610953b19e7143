"""bench/_common.py, the header every bench result records: versions against the modules' own, the host record keeping
every key the scripts wrote before it was shared (result files keep their shape), and the results file's name."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

import numpy
import torch

_BENCH = Path(__file__).parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_common", _BENCH / "_common.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)


def test_versions_match_the_modules_and_skip_absent_packages():
    v = C.versions(extra=("numpy", "no-such-package-edgeft-test"))
    assert v["python"] == platform.python_version()
    assert v["torch"] == torch.__version__ and v["numpy"] == numpy.__version__
    assert "no-such-package-edgeft-test" not in v and None not in v.values()
    head = subprocess.run(["git", "log", "-1", "--format=%H"], cwd=_BENCH, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (an sdist has none)
        assert len(v["edgeft_commit"]) >= 7 and head.stdout.startswith(v["edgeft_commit"])


def test_device_keeps_every_key_the_scripts_wrote(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    d = C.device()
    # accuracy.py's, precision_quality.py's, host_decode.py's and train_throughput.py's keys before they were shared
    keys = {"cpu", "cores", "torch_threads", "cuda", "aten_cpu_capability", "logical_cpus", "usable_cpus", "simd"}
    assert keys | {"machine", "name"} <= d.keys()
    assert d["cores"] == d["logical_cpus"] == os.cpu_count() and d["torch_threads"] == torch.get_num_threads()
    assert d["aten_cpu_capability"] == "default" and d["machine"] == platform.machine()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        assert d["name"] == p.name and d["capability"] == f"{p.major}.{p.minor}" and d["cuda"] == torch.version.cuda
        assert {"memory_gib", "sms", "driver"} <= d.keys()
    else:
        assert d["cuda"] is None and d["name"] == "cpu"


def test_result_path_names_bench_date_device_and_tag():
    day = f"{dt.date.today():%Y%m%d}"
    dev = "gpu" if torch.cuda.is_available() else "cpu"
    assert C.result_path("accuracy", "") == _BENCH / "results" / f"accuracy-{day}-{dev}.json"
    assert C.result_path("pte_logits", "s1", C.slug("AMD EPYC 9B14 96-Core Processor")).name == (
        f"pte_logits-{day}-amd-epyc-9b14-96-core-pr-s1.json"
    )
