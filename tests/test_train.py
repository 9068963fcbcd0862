"""The training engine: theta0, pre-training, distillation, exact resume, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kcd.checkpoint import load_file
from kcd.config import statistics_spec, train_spec, validate_config
from kcd.errors import KcdError
from kcd.models import build_model
from kcd.statistics import compute_statistics, make_transform
from kcd.train import CHECKPOINT, FINAL, RESULT, init_weights, train

REPO = Path(__file__).resolve().parents[1]


def _pretrain(cfg, tmp_path, arch, seed=0, name=None, save_anchors=False):
    theta0 = tmp_path / f"{arch}-s{seed}.pt"
    if not theta0.exists():
        init_weights(arch, seed, 100, theta0)
    spec = train_spec(cfg, dataset="cifar100", arch=arch, seed=seed, theta0=str(theta0),
                      out_dir=str(tmp_path / (name or f"{arch}-s{seed}")),
                      save_anchors=save_anchors)
    return theta0, spec, train(spec, progress=False)


def test_same_theta0_same_start_and_distill_reloads_it(tiny_cfg, tmp_path):
    cfg, _ = tiny_cfg
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    init_weights("resnet20_0.5x", 3, 100, a)
    init_weights("resnet20_0.5x", 3, 100, b)
    sa, sb = load_file(a)["state_dict"], load_file(b)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    init_weights("resnet20_0.5x", 4, 100, tmp_path / "c.pt")
    sc = load_file(tmp_path / "c.pt")["state_dict"]
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])

    # A distillation run with zero iterations of effect (lr tiny) still starts from theta0:
    # train one iteration with lr ~ 0 and compare the weights with theta0.
    theta0, _, _ = _pretrain(cfg, tmp_path, "resnet20", name="teacher")
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["recipes"]["cifar100"]["default"].update(iterations=1, lr=1e-30, weight_decay=0.0,
                                                  milestones=[])
    spec = train_spec(cfg2, dataset="cifar100", arch="resnet20_0.5x", seed=3, theta0=str(a),
                      out_dir=str(tmp_path / "d"), method="kd", teacher="resnet20",
                      teacher_weights=str(tmp_path / "teacher" / FINAL))
    train(spec, progress=False)
    final = load_file(tmp_path / "d" / FINAL)["state_dict"]
    for k, v in sa.items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(final[k], v, atol=1e-12), k


def test_pretrain_writes_result_final_and_anchors(tiny_cfg, tmp_path):
    cfg, _ = tiny_cfg
    _, spec, result = _pretrain(cfg, tmp_path, "resnet20_0.5x", save_anchors=True)
    out = Path(spec.out_dir)
    assert (out / FINAL).exists() and (out / RESULT).exists()
    assert not (out / CHECKPOINT).exists()
    assert spec.anchor_iterations == [2, 4]  # methods.rco.anchors = 3 over 6 iterations
    assert sorted(p.name for p in (out / "anchors").iterdir()) == ["iter-2.pt", "iter-4.pt"]
    saved = json.loads((out / RESULT).read_text())
    assert saved["top1"] == result["top1"] and 0 <= saved["top1"] <= 100
    assert saved["eval_images"] == 400  # tiny demo: 4 test images x 100 classes


@pytest.fixture(scope="module")
def trained_pair(demo_root, tmp_path_factory):
    """A pre-trained resnet20 teacher (with RCO anchors), a resnet20_0.5x student, and the
    bipartite-correlation transform between them."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("pair")
    cfg = tiny_config(demo_root, tmp / "results")
    _pretrain(cfg, tmp, "resnet20", name="teacher", save_anchors=True)
    theta0, _, _ = _pretrain(cfg, tmp, "resnet20_0.5x", name="student")
    stats = tmp / "stats.pt"
    compute_statistics(statistics_spec(
        cfg, dataset="cifar100", teacher="resnet20", teacher_weights=str(tmp / "teacher" / FINAL),
        student="resnet20_0.5x", student_weights=str(tmp / "student" / FINAL), out=str(stats),
        metrics=["correlation"]), progress=False)
    from kcd.statistics import STATISTICS_KEYS  # what a reader checks is what is written

    assert set(torch.load(stats, weights_only=True)) == {"kind", *STATISTICS_KEYS}
    transform = tmp / "bipartite.pt"
    meta = make_transform(stats, "bipartite", "correlation", transform)
    assert meta["gamma_after"] is not None and meta["student"] == "resnet20_0.5x"
    anchors = [str(tmp / "teacher" / "anchors" / f"iter-{i}.pt") for i in (2, 4)]
    anchors.append(str(tmp / "teacher" / FINAL))
    return cfg, tmp, theta0, transform, anchors


@pytest.mark.parametrize("method", ["kd", "fitnets", "at", "rkd", "ab", "rco", "l2"])
def test_every_method_runs_with_and_without_transform(trained_pair, tmp_path, method):
    cfg, pair, theta0, transform, anchors = trained_pair
    # kd uses logits only; l2 ("Ours") needs equal channels, i.e. the transform (64 -> 32)
    variants = {"kd": [None], "l2": [str(transform)]}.get(method, [None, str(transform)])
    student_convs = sum(isinstance(m, torch.nn.Conv2d)
                        for m in build_model("resnet20_0.5x", 100).modules())
    for t in variants:
        out = tmp_path / f"{method}-{t is not None}"
        spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                          theta0=str(theta0), out_dir=str(out), method=method,
                          teacher="resnet20", teacher_weights=str(pair / "teacher" / FINAL),
                          transforms=[t] if t else None, anchors=anchors)
        result = train(spec, progress=False)
        assert result["teacher_kl"] >= 0 and (out / FINAL).exists()
        # on a CPU the student's convolutions take kcd.models.small_conv, and so do the 1x1
        # regressors of FitNets, AB and RCO's hint
        assert result["small_conv_grads"] == student_convs + (method in ("fitnets", "ab", "rco"))
        if t is not None:
            assert result["feature_l2"] is not None and result["feature_l2"] > 0


def _cli(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "kcd.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_resume_after_kill_is_bit_identical(demo_root, tmp_path):
    from tests.conftest import tiny_config
    import yaml

    cfg = tiny_config(demo_root, tmp_path / "results", iterations=40, checkpoint_every=3,
                      batch_size=32)
    cfgp = tmp_path / "c.yaml"
    cfgp.write_text(yaml.safe_dump(cfg))
    theta0 = tmp_path / "theta0.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    common = ["pretrain", "--config", str(cfgp), "--dataset", "cifar100", "--arch",
              "resnet20_0.5x", "--seed", "0", "--theta0", str(theta0), "--no-track", "-q"]
    ref = _cli([*common, "--out", str(tmp_path / "ref")], REPO)
    assert ref.returncode == 0, ref.stderr
    # Kill a second run as soon as it has written a checkpoint part-way, then rerun it.
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kcd.cli", *common, "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / CHECKPOINT).exists():
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / CHECKPOINT).exists() and not (out / RESULT).exists()
    step = load_file(out / CHECKPOINT)["step"]
    assert 0 < step < 40
    again = _cli([*common, "--out", str(out)], REPO)
    assert again.returncode == 0, again.stderr
    a = load_file(tmp_path / "ref" / FINAL)["state_dict"]
    b = load_file(out / FINAL)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "ref" / RESULT).read_text())
    rb = json.loads((out / RESULT).read_text())
    for k in ("top1", "top5", "loss"):
        assert ra[k] == rb[k]


def test_nan_loss_names_iteration_and_term(tiny_cfg, tmp_path):
    cfg, _ = tiny_cfg
    cfg["recipes"]["cifar100"]["default"]["lr"] = 1e30
    theta0 = tmp_path / "t.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0, theta0=str(theta0),
                      out_dir=str(tmp_path / "nan"))
    with pytest.raises(KcdError, match=r"loss term 'ce' is (nan|inf) at iteration \d+"):
        train(spec, progress=False)
    assert not (tmp_path / "nan" / RESULT).exists()


def test_bad_input_gives_one_line_and_nonzero_exit(tiny_cfg, tmp_path):
    cfg, cfgp = tiny_cfg
    theta0 = tmp_path / "t.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    base = ["--config", str(cfgp), "--no-track", "-q"]

    def run(*args):
        r = _cli([*args], REPO)
        assert r.returncode == 2, r.stderr
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("kcd: error:"), r.stderr
        return lines[0]

    # missing dataset root
    msg = run("pretrain", *base, "--set", "datasets.cifar100.root=/nonexistent/x", "--dataset",
              "cifar100", "--arch", "resnet20_0.5x", "--seed", "0", "--theta0", str(theta0),
              "--out", str(tmp_path / "o1"))
    assert "/nonexistent/x" in msg and "does not exist" in msg
    # a root in the wrong format (an ImageFolder tree given as CIFAR root)
    msg = run("pretrain", *base, "--set", f"datasets.cifar100.root={tmp_path}", "--dataset",
              "cifar100", "--arch", "resnet20_0.5x", "--seed", "0", "--theta0", str(theta0),
              "--out", str(tmp_path / "o2"))
    assert "cifar" in msg.lower()
    # unknown method
    msg = run("distill", *base, "--dataset", "cifar100", "--student", "resnet20_0.5x",
              "--theta0", str(theta0), "--teacher", "resnet20", "--teacher-weights", str(theta0),
              "--method", "nosuch", "--seed", "0", "--out", str(tmp_path / "o3"))
    assert "nosuch" in msg and "fitnets" in msg
    # a checkpoint of another architecture
    msg = run("pretrain", *base, "--dataset", "cifar100", "--arch", "resnet56", "--seed", "0",
              "--theta0", str(theta0), "--out", str(tmp_path / "o4"))
    assert "resnet20_0.5x" in msg and "resnet56" in msg
    # a truncated checkpoint file
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(theta0.read_bytes()[:1000])
    msg = run("pretrain", *base, "--dataset", "cifar100", "--arch", "resnet20_0.5x", "--seed",
              "0", "--theta0", str(trunc), "--out", str(tmp_path / "o5"))
    assert "trunc.pt" in msg and "truncated" in msg
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / o / RESULT).exists() and not (tmp_path / o / FINAL).exists()


def test_transform_for_another_student_is_rejected(tiny_cfg, tmp_path):
    from kcd.transforms import ChannelTransform, save_transform

    cfg, _ = tiny_cfg
    theta0 = tmp_path / "t.pt"
    init_weights("resnet20_0.5x", 0, 100, theta0)
    init_weights("resnet20", 0, 100, tmp_path / "teacher.pt")
    bad = tmp_path / "bad.pt"
    save_transform(ChannelTransform(torch.arange(64), 64, meta={"student": "resnet20"}), bad)
    spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0, theta0=str(theta0),
                      out_dir=str(tmp_path / "o"), method="l2", teacher="resnet20",
                      teacher_weights=str(tmp_path / "teacher.pt"), transforms=[str(bad)])
    with pytest.raises(KcdError, match="made for student resnet20, not resnet20_0.5x"):
        train(spec, progress=False)


def test_bad_config_names_the_key(tiny_cfg):
    cfg, _ = tiny_cfg
    for path, value, key in (
        (("recipes", "cifar100", "default", "lr"), -0.1, "recipes.cifar100.default.lr"),
        (("seeds",), [], "seeds"),
        (("methods", "nosuch"), {"weight": 1}, "methods.nosuch"),
    ):
        bad = json.loads(json.dumps(cfg))
        node = bad
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        with pytest.raises(KcdError, match=f"config key {key}"):
            validate_config(bad)
    validate_config(cfg)


def test_dynamic_transform_is_rematched_from_recorded_features(trained_pair, tmp_path):
    """Table 5: with dynamic_every=E the transform is recomputed every E iterations."""
    from kcd.transforms import load_transform

    cfg, pair, theta0, transform, anchors = trained_pair
    spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0, theta0=str(theta0),
                      out_dir=str(tmp_path / "dyn"), method="l2", teacher="resnet20",
                      teacher_weights=str(pair / "teacher" / FINAL), transforms=[str(transform)],
                      dynamic_every=3)
    calls = []
    import kcd.transforms as transforms

    original = transforms.match
    transforms.match = lambda m, strategy, seed=None: (calls.append(strategy),
                                                       original(m, strategy))[1]
    try:
        result = train(spec, progress=False)
    finally:
        transforms.match = original
    assert calls == ["bipartite", "bipartite"]  # after iterations 3 and 6
    assert result["feature_l2"] is not None
    static = load_transform(transform)  # the file itself is never modified
    assert static.index.numel() == 32


def test_grad_clip_bounds_the_first_update(tiny_cfg, tmp_path):
    """recipe.grad_clip caps the gradient's total norm: with plain SGD (no momentum history, no
    weight decay) the first update moves the weights by at most lr x clip."""
    cfg, _ = tiny_cfg
    clip, lr = 1e-3, 0.1
    for r in cfg["recipes"].values():
        r["default"].update(iterations=1, milestones=[], grad_clip=clip, lr=lr, weight_decay=0.0,
                            momentum=0.0, checkpoint_every=1)
    theta0, spec, _ = _pretrain(cfg, tmp_path, "resnet20_0.5x")
    before = load_file(theta0)["state_dict"]
    after = load_file(Path(spec.out_dir) / FINAL)["state_dict"]
    moved = sum(((after[k].float() - before[k].float()) ** 2).sum()
                for k in before if before[k].is_floating_point() and "running" not in k
                and "num_batches" not in k)
    assert 0 < moved.sqrt() <= lr * clip * (1 + 1e-4)


def test_precision_is_a_recipe_field_recorded_in_the_run(tiny_cfg, tmp_path, monkeypatch):
    # bf16 autocast applies on CUDA only: asked for on this CPU, the run records fp32, and
    # the forward passes ran under a disabled autocast
    cfg, _ = tiny_cfg
    cfg = json.loads(json.dumps(cfg))
    cfg["recipes"]["cifar100"]["default"].update(precision="bf16", iterations=2)
    seen = []
    real = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append((device_type, kwargs.get("enabled")))
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    _, spec, result = _pretrain(cfg, tmp_path, "resnet20_0.5x")
    assert spec.recipe.precision == "bf16" and result["precision"] == "fp32"
    assert seen and all(s == ("cpu", False) for s in seen)
    cfg["recipes"]["cifar100"]["default"]["precision"] = "fp16"
    with pytest.raises(KcdError, match="precision"):
        validate_config(cfg)


def test_cpu_small_conv_grads_is_a_recipe_field_recorded_in_the_run(tiny_cfg, tmp_path):
    # on a CPU the student's eligible convolutions take kcd.models.small_conv (every 3x3 and
    # 1x1 of a CIFAR ResNet); off, none do. Its maps are too large for the faster paths to
    # apply, so both runs end with the same weights.
    cfg, _ = tiny_cfg
    kernels = [m.kernel_size for m in build_model("resnet20_0.5x", 100).modules()
               if isinstance(m, torch.nn.Conv2d)]
    kxk = len(kernels)
    assert kernels.count((3, 3)) == 19 and kernels.count((1, 1)) == 2
    finals = []
    for on in (True, False):
        c = json.loads(json.dumps(cfg))
        c["recipes"]["cifar100"]["default"].update(cpu_small_conv_grads=on, iterations=2)
        _, spec, result = _pretrain(c, tmp_path, "resnet20_0.5x", name=f"run-{on}")
        assert spec.recipe.cpu_small_conv_grads is on
        assert result["small_conv_grads"] == (kxk if on else 0)
        finals.append(load_file(Path(spec.out_dir) / FINAL)["state_dict"])
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key]), key
