"""Fault injection, a full disk: a real process whose writes fail (RLIMIT_FSIZE: the kernel's EFBIG, as ENOSPC would;
no root or tmpfs needed) exits 2 with one error line, no traceback, the old artifacts byte-identical and no
temporary file left."""

from __future__ import annotations

import resource

from faultkit import TRAIN, debris, popen, snapshot

LIMIT = 1 << 20  # 1 MiB: the GGUF, the adapter and the converted model of tiny-llama are larger


def _limit_writes() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))  # Python ignores SIGXFSZ: writes fail with EFBIG


def _run_full(argv, cwd):
    proc = popen(argv, cwd=cwd, preexec_fn=_limit_writes)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.strip().splitlines()


def test_disk_full_during_export(exported_copy):
    before = snapshot(exported_copy)
    rc, err = _run_full(["export", "gguf", "--quant", "f16", "--run", str(exported_copy)], exported_copy.parent)
    assert rc == 2, err
    # gguf-py writes through numpy's tofile, which reports a short write ("N requested and M written")
    assert len(err) == 1 and err[0].startswith("edgeft: error: ") and "nothing was replaced" in err[0], err
    assert snapshot(exported_copy) == before and not debris(exported_copy)


def test_disk_full_during_overwrite(run_copy, data_file):
    before = snapshot(run_copy)
    rc, err = _run_full(
        [*TRAIN, "--data", str(data_file), "--max-steps", "1", "--out", str(run_copy), "--overwrite"], run_copy.parent
    )
    assert rc == 2, err
    # the steps' info lines came first: the error is the last line, the only one, no traceback
    assert err[-1].startswith("edgeft: error: ") and "File too large" in err[-1], err
    assert sum(": error: " in line for line in err) == 1 and not any("Traceback" in line for line in err), err
    assert snapshot(run_copy) == before
    assert not [p for p in run_copy.parent.iterdir() if p.name.startswith(".run.")]
