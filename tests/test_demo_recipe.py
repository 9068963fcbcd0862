"""On the demo data with the demo recipe, the resnet56 teacher clearly beats the
resnet20_0.5x student (so the demo's distillation has something to distil)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kcd.config import train_spec, validate_config
from kcd.data.demo import DemoSizes, write_demo_data
from kcd.train import init_weights, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_teacher_beats_student_on_demo_data(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    write_demo_data(tmp_path / "demo", kinds=("cifar100",), sizes=DemoSizes(), progress=False)
    cfg["datasets"]["cifar100"]["root"] = str(tmp_path / "demo")
    validate_config(cfg)
    top1 = {}
    for arch in ("resnet56", "resnet20_0.5x"):
        theta0 = tmp_path / f"{arch}.pt"
        init_weights(arch, 0, 100, theta0)
        spec = train_spec(cfg, dataset="cifar100", arch=arch, seed=0, theta0=str(theta0),
                          out_dir=str(tmp_path / arch))
        top1[arch] = train(spec, progress=False)["top1"]
    assert top1["resnet56"] > top1["resnet20_0.5x"] + 10, top1
