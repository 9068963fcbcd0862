"""bench/bench_small_conv.py at tiny sizes: every model gets a row with a speed-up and the same
gradients."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prints_a_row_per_model_with_equal_gradients():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_small_conv.py"), "--models",
         "mobilenetv2_0.5x", "resnet20_0.5x", "--batch", "4", "--steps", "1", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"mobilenetv2_0.5x", "resnet20_0.5x"}
    for name, row in rows.items():
        switched, native, fast, speedup, gap = int(row[2]), *map(float, row[3:5]), row[5], row[6]
        assert switched > 0 and native > 0 and fast > 0 and speedup.endswith("x"), row
        assert float(gap) < 1e-4, row
