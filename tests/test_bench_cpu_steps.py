"""bench/bench_cpu_steps.py at tiny sizes: a row per model and per embedding size, each with
a speed-up and the same results."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prints_a_row_per_step_with_equal_results():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_cpu_steps.py"), "--models",
         "resnet20_0.5x", "--batch", "6", "--channels", "8", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [["SGD", "resnet20_0.5x"], ["RKD", "angles"]]
    for row in rows:
        plain, ours, speedup, gap = row.split()[-4:]
        assert float(plain) > 0 and float(ours) > 0, row
        # The milliseconds are printed to 0.01 ms and the ratio comes from the unrounded ones,
        # so it must lie within the ratios the rounded values allow.
        low = (float(plain) - 0.005) / (float(ours) + 0.005)
        high = (float(plain) + 0.005) / max(float(ours) - 0.005, 1e-9)
        assert low - 0.005 <= float(speedup.rstrip("x")) <= high + 0.005, row
        assert float(gap) < 1e-4, row
