"""A teacher's outputs computed once: the same answers as running the teacher, runs that read
them end like runs that do not, and stale or mismatched files are refused."""
from __future__ import annotations

import json

import pytest
import torch

from kcd.config import train_spec
from kcd.data import EVAL_SPLIT, TRAIN_SPLIT
from kcd.errors import KcdError
from kcd.plans import Plans
from kcd.specs import DataSpec, from_dict
from kcd.teacher_outputs import compute, load
from kcd.train import FINAL, init_weights, train


@pytest.fixture(scope="module")
def teacher(demo_root, tmp_path_factory):
    """A briefly trained resnet20 teacher on the tiny CIFAR-format demo data."""
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(demo_root, tmp / "results")
    cfg["datasets"]["cifar100"]["augment"] = False
    cfg["cache_teacher_outputs"] = True
    init_weights("resnet20", 0, 100, tmp / "t0.pt")
    train(train_spec(cfg, dataset="cifar100", arch="resnet20", seed=0, theta0=str(tmp / "t0.pt"),
                     out_dir=str(tmp / "teacher")), progress=False)
    init_weights("resnet20_0.5x", 0, 100, tmp / "s0.pt")
    return cfg, tmp, str(tmp / "teacher" / FINAL)


def _outputs(cfg, tmp, weights, split, layers=("layer3", "layer3:pre_relu")):
    data = from_dict(DataSpec, {"name": "cifar100", **{k: v for k, v in
                                cfg["datasets"]["cifar100"].items() if k != "num_classes"}})
    path = compute("resnet20", weights, 100, data, split, list(layers), tmp / f"{split}.pt",
                   batch_size=64, progress=False)
    return data, path


def test_cached_answers_are_the_teachers(teacher):
    cfg, tmp, weights = teacher
    data, path = _outputs(cfg, tmp, weights, TRAIN_SPLIT)
    got = load(str(path), "resnet20", weights, data, TRAIN_SPLIT, ["layer3:pre_relu"])
    from kcd.data.streams import eval_batches
    from kcd.features import FeatureTap
    from kcd.checkpoint import load_model

    model = load_model("resnet20", weights, 100, "teacher").eval()
    x, _ = next(iter(eval_batches(data, 16, split=TRAIN_SPLIT)))
    with torch.no_grad(), FeatureTap(model, ["layer3:pre_relu"]) as tap:
        logits = model(x)
        feats = tap.features["layer3:pre_relu"]
    index = torch.arange(16)
    t_logits, (t_feats,) = got.take(index, ["layer3:pre_relu"])
    assert len(got) == 1000  # tiny demo: 10 training images x 100 classes
    assert torch.allclose(t_logits, logits, atol=1e-4)
    assert torch.allclose(t_feats, feats, atol=1e-4)
    assert (t_feats < 0).any()  # before the ReLU


@pytest.mark.parametrize("method", ["kd", "fitnets", "ab"])
def test_a_run_reading_the_cache_ends_like_one_running_the_teacher(teacher, method):
    cfg, tmp, weights = teacher
    _outputs(cfg, tmp, weights, TRAIN_SPLIT)
    _outputs(cfg, tmp, weights, EVAL_SPLIT)
    results = []
    for cached in (False, True):
        extra = ({"teacher_outputs": str(tmp / "train.pt"),
                  "teacher_eval_outputs": str(tmp / "val.pt")} if cached else {})
        spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                          theta0=str(tmp / "s0.pt"), out_dir=str(tmp / f"{method}-{cached}"),
                          method=method, teacher="resnet20", teacher_weights=weights, **extra)
        results.append(train(spec, progress=False))
    plain, cached = results
    for key in ("top1", "teacher_kl", "feature_l2", "loss"):
        if plain.get(key) is None:
            assert cached.get(key) is None
        else:
            assert cached[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-3), key


def test_a_stale_or_short_cache_is_refused(teacher, tmp_path):
    cfg, tmp, weights = teacher
    data, path = _outputs(cfg, tmp, weights, TRAIN_SPLIT, layers=("layer3",))
    with pytest.raises(KcdError, match="no features of layer 'layer3:pre_relu'"):
        load(str(path), "resnet20", weights, data, TRAIN_SPLIT, ["layer3:pre_relu"])
    with pytest.raises(KcdError, match="another split"):
        load(str(path), "resnet20", weights, data, EVAL_SPLIT, [])
    other = tmp_path / "other.pt"
    init_weights("resnet20", 5, 100, other)
    with pytest.raises(KcdError, match="another weights_sha256"):
        load(str(path), "resnet20", str(other), data, TRAIN_SPLIT, [])
    # augmented training images have no cached answers
    cfg2 = json.loads(json.dumps(cfg))
    cfg2["datasets"]["cifar100"]["augment"] = True
    spec = train_spec(cfg2, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                      theta0=str(tmp / "s0.pt"), out_dir=str(tmp_path / "run"), method="kd",
                      teacher="resnet20", teacher_weights=weights,
                      teacher_outputs=str(path))
    with pytest.raises(KcdError, match="augment to false"):
        train(spec, progress=False)


def test_plans_give_every_run_but_baseline_the_cache(tiny_cfg):
    cfg, _ = tiny_cfg
    cfg = json.loads(json.dumps(cfg))
    cfg["datasets"]["cifar100"]["augment"] = True
    plans = Plans({**cfg, "cache_teacher_outputs": True})
    run = ("cifar100", "resnet56", 0, "resnet20", "{method}", "none", 0)

    def distill(method):
        return plans.distill_spec(*run[:4], method, *run[5:])["distill"]

    kd = distill("kd")
    assert kd["teacher_eval_outputs"].endswith("cifar100/teachers/resnet56-s0/val.pt")
    assert kd["teacher_outputs"] is None  # augmented training images have no cached answers
    rco = distill("rco")  # its evaluation is the final teacher's, the last anchor
    assert rco["teacher_eval_outputs"] == kd["teacher_eval_outputs"]
    assert rco["teacher_outputs"] is None and rco["anchor_outputs"] == []
    assert plans.run_teacher_outputs(*run[:4], "baseline", *run[5:]) == []
    assert plans.teacher_layers("cifar100", "resnet56") == ["layer3", "layer3:pre_relu"]
    cfg["datasets"]["cifar100"]["augment"] = False
    plans = Plans({**cfg, "cache_teacher_outputs": True})
    assert plans.run_teacher_outputs(*run[:4], "ab", *run[5:]) == [
        f"{cfg['results']}/cifar100/teachers/resnet56-s0/{s}.pt" for s in ("train", "val")]
    spec = plans.teacher_outputs_spec("cifar100", "resnet56", 0, "train")
    assert spec["layers"] == ["layer3", "layer3:pre_relu"] and spec["split"] == "train"
    # RCO on unaugmented images: one file per anchor of its route, the final teacher's last
    rco = plans.distill_spec(*run[:4], "rco", *run[5:])["distill"]
    teachers = f"{cfg['results']}/cifar100/teachers/resnet56-s0"
    assert len(rco["anchors"]) == len(rco["anchor_outputs"]) == 3  # the tiny config's
    assert rco["anchor_outputs"][-1] == f"{teachers}/train.pt" and rco["teacher_outputs"] is None
    assert all(p.startswith(f"{teachers}/anchors/iter-") for p in rco["anchor_outputs"][:2])
    assert plans.run_teacher_outputs(*run[:4], "rco", *run[5:]) == [
        f"{teachers}/val.pt", *rco["anchor_outputs"]]
    iteration = int(rco["anchors"][0].rsplit("iter-", 1)[1].removesuffix(".pt"))
    spec = plans.anchor_outputs_spec("cifar100", "resnet56", 0, iteration)
    assert spec["teacher_weights"] == rco["anchors"][0] and spec["layers"] == ["layer3"]
    assert spec["out"] == rco["anchor_outputs"][0] and spec["split"] == "train"
    assert not Plans({**cfg, "cache_teacher_outputs": False}).run_teacher_outputs(
        *run[:4], "kd", *run[5:])


def test_an_rco_run_reading_each_anchors_cache_ends_like_one_loading_the_anchors(teacher):
    cfg, tmp, _ = teacher
    teacher_dir = tmp / "rco-teacher"
    train(train_spec(cfg, dataset="cifar100", arch="resnet20", seed=0, theta0=str(tmp / "t0.pt"),
                     out_dir=str(teacher_dir), save_anchors=True), progress=False)
    anchors = sorted(str(p) for p in (teacher_dir / "anchors").glob("iter-*.pt"))
    anchors = sorted(anchors, key=lambda p: int(p.rsplit("-", 1)[1][:-3])) + [
        str(teacher_dir / FINAL)]
    assert len(anchors) == 3
    data = from_dict(DataSpec, {"name": "cifar100", **{k: v for k, v in
                                cfg["datasets"]["cifar100"].items() if k != "num_classes"}})
    files = [str(compute("resnet20", a, 100, data, TRAIN_SPLIT, ["layer3"], tmp / f"a{i}.pt",
                         batch_size=64, progress=False)) for i, a in enumerate(anchors)]
    results = []
    for cached in (False, True):
        spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                          theta0=str(tmp / "s0.pt"), out_dir=str(tmp / f"rco-{cached}"),
                          method="rco", teacher="resnet20", teacher_weights=anchors[-1],
                          anchors=anchors, anchor_outputs=files if cached else [])
        results.append(train(spec, progress=False))
    plain, cached = results
    for key in ("top1", "teacher_kl", "feature_l2", "loss"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-3), key
    # a file of another anchor, or one file short, is refused in one line
    for wrong, message in ((files[::-1], "another weights_sha256"),
                           (files[:2], "2 files for 3 anchors")):
        spec = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                          theta0=str(tmp / "s0.pt"), out_dir=str(tmp / "rco-wrong"),
                          method="rco", teacher="resnet20", teacher_weights=anchors[-1],
                          anchors=anchors, anchor_outputs=wrong)
        with pytest.raises(KcdError, match=message):
            train(spec, progress=False)


def test_a_decoded_split_gives_the_standard_paths_batches(demo_root, tmp_path):
    from kcd.data.decoded import decode, load as load_decoded
    from kcd.data.streams import eval_batches, train_stream

    data = DataSpec(name="imagenet", root=str(demo_root / "imagenet"), image_size=24,
                    augment=False)
    for split in (TRAIN_SPLIT, EVAL_SPLIT):
        decode(data, split, tmp_path / f"{split}.pt", progress=False)
    fast = DataSpec(**{**data.__dict__, "decoded": str(tmp_path)})
    (x0, y0), (x1, y1) = (next(iter(eval_batches(d, 64, split=TRAIN_SPLIT))) for d in (data, fast))
    assert x1.shape == (12, 3, 24, 24) and torch.equal(y0, y1)  # tiny: 3 classes x 4 images
    assert torch.allclose(x0, x1, atol=1e-6)
    # the training stream reads the same images, with their dataset indices
    x, y, index = next(train_stream(fast, 4).iterate_forever(indices=True))
    assert torch.allclose(x, x0[index], atol=1e-6) and torch.equal(y, y0[index])
    # a changed image folder is noticed
    first = next((demo_root / "imagenet" / "val").rglob("*.png"))
    stat = first.stat()
    try:
        import os
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        with pytest.raises(KcdError, match="other image files"):
            load_decoded(tmp_path / "val.pt", data, EVAL_SPLIT)
    finally:
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_plans_decode_image_folders_only_without_augmentation(tiny_cfg):
    cfg, _ = tiny_cfg
    cfg = json.loads(json.dumps(cfg))
    cfg["datasets"]["imagenet"]["augment"] = True
    assert not Plans(cfg).decodes("imagenet")
    cfg["datasets"]["imagenet"]["augment"] = False
    plans = Plans(cfg)
    assert plans.decodes("imagenet") and not plans.decodes("cifar100")
    folder = f"{cfg['results']}/imagenet/data"
    assert plans.data_input("imagenet")[-2:] == [f"{folder}/train.pt", f"{folder}/val.pt"]
    assert not any(p.endswith(".pt") for p in plans.data_input("imagenet", decoded=False))
    spec = plans.pretrain_spec("imagenet", "resnet18", 0)
    assert spec["data"]["decoded"] == folder
    assert plans.decode_spec("imagenet", "val")["data"]["decoded"] is None


def test_the_commands_take_the_workflows_specs(teacher, demo_root, tmp_path):
    from kcd.cli import main

    cfg, tmp, weights = teacher
    data = {"name": "cifar100", **{k: v for k, v in cfg["datasets"]["cifar100"].items()
                                   if k != "num_classes"}}
    spec = {"teacher": "resnet20", "teacher_weights": weights, "num_classes": 100,
            "data": data, "split": "val", "layers": ["layer3"], "out": str(tmp_path / "v.pt")}
    assert main(["teacher-outputs", "--spec", json.dumps(spec), "-q"]) == 0
    assert len(load(spec["out"], "resnet20", weights, from_dict(DataSpec, data), "val",
                    ["layer3"])) == 400  # the tiny test split (fewer than the eval_limit)
    image_data = {"name": "imagenet", "root": str(demo_root / "imagenet"), "image_size": 24}
    decode_spec = {"data": image_data, "split": "val", "out": str(tmp_path / "val.pt")}
    assert main(["decode", "--spec", json.dumps(decode_spec), "-q"]) == 0
    assert (tmp_path / "val.pt").exists()
