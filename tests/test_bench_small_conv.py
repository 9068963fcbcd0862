"""bench/bench_small_conv.py at tiny sizes: every model gets a row with a speed-up and the same
gradients, and a step's counted work, its rate and that rate's share of the matrix-product
peak agree with each other."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_bench
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("bench_small_conv")


def test_prints_a_row_per_model_with_equal_gradients_and_its_share_of_peak():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_small_conv.py"), "--models",
         "mobilenetv2_0.5x", "resnet20_0.5x", "--batch", "4", "--steps", "1", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    peak = float(re.search(r"peak \(.*\) ([\d.]+) GFLOP/s", lines[0]).group(1))
    assert peak > 0
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"mobilenetv2_0.5x", "resnet20_0.5x"}
    for name, row in rows.items():
        switched, native, fast, speedup, gap = int(row[2]), *map(float, row[3:5]), row[5], row[6]
        assert switched > 0 and native > 0 and fast > 0 and speedup.endswith("x"), row
        assert float(gap) < 1e-4, row
        work, rate, share = map(float, row[7:10])
        assert work > 0, row
        # work, times and rate are printed rounded: the rate lies within what their digits allow
        best = min(native, fast)
        low = (work - 5e-4) / (best + 0.05) * 1000 - 0.05
        high = (work + 5e-4) / max(best - 0.05, 1e-3) * 1000 + 0.05
        assert low <= rate <= high, row
        assert share == pytest.approx(rate / peak, abs=0.006 + 0.001 * rate / peak), row


def test_step_work_is_the_forward_and_both_gradients_of_each_product():
    bench = _bench()
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.Linear(6, 5, bias=False))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    # forward 2*4*(12*6 + 6*5) FLOP; backward the same again for the weights' gradients and
    # 2*4*6*5 for the gradient between the layers (the images need none)
    assert bench.step_gflop(model, x, y) * 1e9 == pytest.approx(2 * 4 * (2 * (12 * 6 + 6 * 5) + 6 * 5))
    assert all(p.grad is None for p in model.parameters())


def test_the_peak_is_a_positive_rate():
    assert _bench().matmul_gflops(size=64, repeats=1) > 0
