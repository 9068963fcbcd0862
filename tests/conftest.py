"""Shared fixtures: tiny demo data (written once per session) and a tiny pipeline config; the
benchmark scripts loaded as modules."""
from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """``bench/<name>.py`` as the module ``name`` (registered: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def as_at_a_terminal() -> None:
    """``preexec_fn`` for a process a test stops with Ctrl-C: SIGINT with its default action, as
    under an interactive shell, whatever the test runner inherited. A runner started in the
    background without job control (``cmd &`` in a script, nohup) ignores SIGINT, an ignored
    signal stays ignored across exec, and Snakemake and kcd.launch then rightly leave it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Tiny demo CIFAR-100 and ImageFolder data in the real formats."""
    from kcd.data.demo import DemoSizes, write_demo_data

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, seed=0, kinds=("cifar100", "imagenet"), sizes=DemoSizes.tiny(),
                    progress=False)
    return root


def tiny_config(demo_root: Path, results: Path, **recipe) -> dict:
    """The demo config shrunk to a few iterations on the tiny demo data."""
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["results"] = str(results)
    cfg["datasets"]["cifar100"]["root"] = str(demo_root)
    cfg["datasets"]["imagenet"]["root"] = str(demo_root / "imagenet")
    cfg["datasets"]["imagenet"]["num_classes"] = 3
    r = {"iterations": 6, "batch_size": 16, "lr": 0.05, "milestones": [4],
         "checkpoint_every": 2, "log_every": 2, "eval_batch_size": 64}
    r.update(recipe)
    cfg["recipes"] = {"cifar100": {"default": dict(r)}, "imagenet": {"default": dict(r)}}
    cfg["methods"]["ab"]["init_iterations"] = 2
    cfg["methods"]["rco"]["anchors"] = 3  # two intermediate teacher checkpoints, then the final
    cfg.pop("ablations")  # the demo's ablation settings do not fit 3 classes
    cfg.pop("figure1")
    return cfg


@pytest.fixture
def tiny_cfg(demo_root, tmp_path) -> tuple[dict, Path]:
    """(config dict, path of the same config written as YAML) in a fresh results folder."""
    cfg = tiny_config(demo_root, tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path
