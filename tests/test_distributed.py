"""DistributedDataParallel on the CPU (gloo): 2 processes equal 1 process with the same global
batch (split into the same 2 strided micro-batches, so batch-norm sees the same samples)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kcd.checkpoint import load_file
from kcd.train import FINAL, init_weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_processes_equal_one_process_with_the_same_global_batch(demo_root, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(demo_root, tmp_path / "results", iterations=5, batch_size=32,
                      checkpoint_every=100)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    theta0 = tmp_path / "theta0.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    args = ["pretrain", "--config", str(cfgp), "--dataset", "cifar100", "--arch", "resnet20_0.5x",
            "--seed", "0", "--theta0", str(theta0), "--no-track", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "kcd.cli", *args, "--out", str(tmp_path / "one"),
                          "--set", "recipes.cifar100.default.micro_batches=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "kcd.cli", *args,
                          "--out", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / FINAL)["state_dict"]
    b = load_file(tmp_path / "two" / FINAL)["state_dict"]
    start = load_file(theta0)["state_dict"]
    params = [k for k in a if "running" not in k and "num_batches" not in k]
    assert any(not torch.equal(a[k], start[k]) for k in params)  # it did train
    for k in params:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
