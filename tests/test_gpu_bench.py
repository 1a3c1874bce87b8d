"""bench/gpu_bench.py --tiny: the GPU window's script, whole, on CPU (issue 24). Its numbers say
nothing about a GPU; this checks that every stage runs and reports, so the one GPU window is not
spent finding a broken script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_reports_every_stage(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OUT=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    log = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    # parity first, on rows within the segment bound and past it, below the tolerance
    parity = re.search(r"tiny parity xla vs float32: within bound: max \|error\| (\S+); a row of 33 runs: "
                       r"max \|error\| (\S+) -> ok", log)
    assert parity and 0 < float(parity.group(1)) < 2e-2 and 0 < float(parity.group(2)) < 2e-2, log
    assert log.index("parity") < log.index("impl xla")
    ours = re.search(r"impl xla, step ms \S+, tokens/s ([\d,.]+), .*compile s cold ([\d.]+), compile s cached ([\d.]+)", log)
    assert ours and float(ours.group(2)) > 0 and float(ours.group(3)) > 0, log
    assert "transformers" in log and "eager (sdpa)" in log
    assert re.search(r"impl extract end to end \(xla, marginal\), step ms [\d.]+, tokens/s [\d,.]+", log), log
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert 2 <= len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in files)
    hlo = (tmp_path / "out" / "tiny_xla_step.hlo.txt").read_text()
    assert hlo.startswith("HloModule") and "while" in hlo
    assert any(p.name.endswith(".xplane.pb") for p in files)


def test_a_kernel_that_cannot_run_here_is_refused_in_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), "--tiny", "--attention", "cudnn"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("gpu_bench: attention implementation 'cudnn' needs a GPU; "
                                                    "the mesh's devices are cpu")
