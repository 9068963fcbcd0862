"""Tests of kcd.data: demo data in the real formats, the dataset registry, the tensor loader."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from pycocotools.coco import COCO
from torchvision.datasets import CIFAR100, CocoDetection, ImageFolder

from kcd.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    DemoSizes,
    LocalCIFAR10,
    LocalCIFAR100,
    TensorDataLoader,
    build_dataset,
    check_num_classes,
    coco_target_to_tensors,
    load_cifar_pickle,
    num_classes,
    write_demo_data,
)
from kcd.data.datasets import CIFAR_PICKLE_GLOBALS
from kcd.data.demo import MANIFEST
from kcd.data.loader import crop_flip
from kcd.errors import KcdError

TINY = DemoSizes.tiny()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), seed=0, sizes=TINY, progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- demo data formats


def test_cifar_pickles_have_the_cifar100_layout(demo):
    folder = demo["cifar100"] / "cifar-100-python"
    for split, per_class in (("train", TINY.cifar_train_per_class), ("test", TINY.cifar_test_per_class)):
        with open(folder / split, "rb") as f:  # as the CIFAR web page reads it
            raw = pickle.load(f, encoding="bytes")
        assert set(raw) == {b"data", b"fine_labels", b"coarse_labels", b"filenames", b"batch_label"}
        assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (100 * per_class, 3072)
        assert isinstance(raw[b"batch_label"], bytes)
        assert all(isinstance(n, bytes) for n in raw[b"filenames"])
        with open(folder / split, "rb") as f:  # as torchvision reads it
            entry = pickle.load(f, encoding="latin1")
        assert set(entry) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
        fine, coarse = np.array(entry["fine_labels"]), np.array(entry["coarse_labels"])
        assert np.bincount(fine, minlength=100).tolist() == [per_class] * 100
        assert coarse.min() == 0 and coarse.max() == 19
        assert all(len(set(coarse[fine == c])) == 1 for c in range(100))  # one superclass per class
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


def test_cifar_is_read_by_torchvision(demo):
    with pytest.raises(RuntimeError):  # torchvision's own md5 check rejects the synthetic files
        CIFAR100(str(demo["cifar100"]), train=True)
    train = LocalCIFAR100(str(demo["cifar100"]), train=True)
    assert len(train) == 100 * TINY.cifar_train_per_class and len(train.classes) == 100
    image, label = train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label < 100
    test = build_dataset("cifar100", demo["cifar100"], "test")
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert len(test) == 100 * TINY.cifar_test_per_class
    assert num_classes("cifar100", demo["cifar100"]) == 100


def test_imagenet_is_an_image_folder(demo):
    splits = (("train", TINY.imagenet_train_per_class), ("val", TINY.imagenet_val_per_class))
    for split, per_class in splits:
        folder = ImageFolder(str(demo["imagenet"] / split))
        assert len(folder.classes) == TINY.imagenet_classes and folder.classes[0] == "n00000000"
        assert len(folder) == TINY.imagenet_classes * per_class
        image, label = folder[0]
        assert image.size == (TINY.imagenet_image_size,) * 2 and 0 <= label < TINY.imagenet_classes
    x, _ = build_dataset("imagenet", demo["imagenet"], "train", image_size=24)[0]
    assert x.shape == (3, 24, 24)
    assert build_dataset("imagenet", demo["imagenet"], "val", image_size=24)[0][0].shape == (3, 24, 24)
    assert num_classes("imagenet", demo["imagenet"]) == TINY.imagenet_classes


def test_coco_is_read_by_cocodetection_and_pycocotools(demo):
    size = TINY.coco_image_size
    for split, count in (("train", TINY.coco_train_images), ("val", TINY.coco_val_images)):
        ann_file = demo["coco"] / "annotations" / f"instances_{split}2017.json"
        coco = COCO(str(ann_file))
        assert len(coco.getImgIds()) == count and len(coco.getCatIds()) == TINY.coco_categories
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= size and y + h <= size
            assert ann["area"] == w * h and ann["iscrowd"] == 0
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert 1 <= min(per_image) and max(per_image) <= 4
        dataset = CocoDetection(str(demo["coco"] / f"{split}2017"), str(ann_file))
        image, anns = dataset[0]
        assert image.size == (size, size) and anns and anns[0]["image_id"] == dataset.ids[0]
    checked = build_dataset("coco", demo["coco"], "val")
    image, anns = checked[0]
    target = coco_target_to_tensors(anns, checked.ids[0])
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert bool((target["boxes"][:, 2:] > target["boxes"][:, :2]).all())
    assert bool((target["labels"] >= 1).all()) and int(target["image_id"]) == checked.ids[0]
    assert num_classes("coco", demo["coco"]) == TINY.coco_categories + 1


# --------------------------------------------------------------------------- determinism and reuse


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, sizes=TINY, progress=False)
    write_demo_data(tmp_path / "b", seed=3, sizes=TINY, progress=False)
    c = write_demo_data(tmp_path / "c", seed=4, sizes=TINY, progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    parts = (("cifar100", "cifar-100-python/train"), ("imagenet", "val"), ("coco", "annotations"))
    for kind, name in parts:
        path_a, path_c = a[kind] / name, c[kind] / name
        files_a = _files(path_a) if path_a.is_dir() else {"": path_a.read_bytes()}
        files_c = _files(path_c) if path_c.is_dir() else {"": path_c.read_bytes()}
        assert files_a != files_c, kind


def test_complete_output_is_skipped_and_other_settings_rewrite(tmp_path):
    write_demo_data(tmp_path, seed=0, kinds=["cifar100"], sizes=TINY, progress=False)
    train = tmp_path / "cifar-100-python" / "train"
    before = train.stat().st_mtime_ns
    write_demo_data(tmp_path, seed=0, kinds=["cifar100"], sizes=TINY, progress=False)
    assert train.stat().st_mtime_ns == before
    old = train.read_bytes()
    write_demo_data(tmp_path, seed=1, kinds=["cifar100"], sizes=TINY, progress=False)
    assert train.read_bytes() != old
    assert json.loads((train.parent / MANIFEST).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python"]  # no temporary leftovers


def test_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "mine.txt").write_text("a user's file")
    with pytest.raises(KcdError, match="not written by"):
        write_demo_data(tmp_path, kinds=["imagenet"], sizes=TINY, progress=False)
    assert (tmp_path / "imagenet" / "mine.txt").exists()


def test_empty_target_folder_is_filled(tmp_path):
    # Snakemake creates an output's parent folder before the job runs.
    (tmp_path / "imagenet").mkdir()
    write_demo_data(tmp_path, kinds=["imagenet"], sizes=TINY, progress=False)
    assert (tmp_path / "imagenet" / MANIFEST).exists()


def test_bad_demo_request():
    with pytest.raises(KcdError, match="unknown demo dataset"):
        write_demo_data("/nonexistent-never-created", kinds=["mnist"], progress=False)
    with pytest.raises(KcdError, match="coco_categories"):
        write_demo_data("/nonexistent-never-created", sizes=DemoSizes(coco_categories=9), progress=False)


def test_classes_are_distinguishable_but_not_identical(tmp_path):
    # The CIFAR-format classes are easy for a nearest-class-mean on pooled pixels (about 90%;
    # chance 1%): the demo's students see each image about half a time, and what they learn
    # in that is the point. They must not be pixel-identical within a class either.
    sizes = DemoSizes(cifar_train_per_class=30, cifar_test_per_class=10)
    write_demo_data(tmp_path, kinds=["cifar100"], sizes=sizes, progress=False)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = LocalCIFAR100(str(tmp_path), train=split == "train")
        x = data.data.astype(np.float32).reshape(-1, 8, 4, 8, 4, 3).mean(axis=(2, 4))  # 8x8 pixels
        return x.reshape(len(x), -1), np.array(data.targets)

    (x_train, y_train), (x_test, y_test) = features("train"), features("test")
    means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(100)])
    predicted = ((x_test[:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = float((predicted == y_test).mean())
    assert 0.5 < accuracy < 0.97, accuracy  # chance is 0.01


# --------------------------------------------------------------------------- TensorDataLoader


def test_loader_batches_equal_the_standard_transform_without_augmentation(demo):
    dataset = build_dataset("cifar100", demo["cifar100"], "test", train_transform=False)
    loader = TensorDataLoader.from_cifar(dataset, batch_size=64, shuffle=False, augment=False)
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.stack([dataset[i][0] for i in range(64)])
    assert torch.equal(x, expected)
    assert y.tolist() == dataset.targets[:64]
    assert len(loader) == -(-len(dataset) // 64)
    channels_last = TensorDataLoader.from_cifar(dataset, batch_size=8, channels_last=True)
    assert next(iter(channels_last))[0].is_contiguous(memory_format=torch.channels_last)


def test_crop_flip_equals_torchvision_pad_crop_flip():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    offsets = torch.randint(0, 9, (6, 2), generator=generator)
    flips = torch.tensor([True, False, True, False, True, False])
    out = crop_flip(images, offsets, flips, padding=4)
    for i in range(6):
        ref = TF.crop(TF.pad(images[i], [4]), int(offsets[i, 0]), int(offsets[i, 1]), 32, 32)
        assert torch.equal(out[i], TF.hflip(ref) if flips[i] else ref)


def test_augmentation_distribution_matches_random_crop_and_flip():
    n = 4000
    rows = torch.arange(1, 33, dtype=torch.uint8)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = rows[:, None]  # channel 0 encodes the row, channel 1 the column
    images[:, 1] = rows[None, :]
    loader = TensorDataLoader(
        images, torch.zeros(n), batch_size=n, mean=(0, 0, 0), std=(1, 1, 1), seed=1
    )
    x, _ = next(iter(loader))
    pixels = torch.round(x * 255).long()
    top = pixels[:, 0, 16, 16] - 1 - 12
    flipped = pixels[:, 1, 16, 17] < pixels[:, 1, 16, 15]
    left = pixels[:, 1, 16, 16] - 1 - torch.where(flipped, 11, 12)
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9).double()
        assert len(counts) == 9 and int(offsets.min()) == 0
        chi2 = float(((counts - n / 9) ** 2 / (n / 9)).sum())
        assert chi2 < 26.1, chi2  # 99.9% quantile of chi-square with 8 degrees of freedom
    assert abs(float(flipped.double().mean()) - 0.5) < 0.03
    assert int((pixels[:, 0] == 0).any(dim=2).sum()) > 0  # zero padding shows up at the borders


def _collect(stream, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(stream) for _ in range(count)]


def test_resume_yields_the_same_remaining_batches(demo):
    train = LocalCIFAR100(str(demo["cifar100"]), train=True)
    kwargs = dict(batch_size=64, seed=5, drop_last=True)
    loader = TensorDataLoader.from_cifar(train, **kwargs)
    assert len(loader) == 15
    stream = loader.iterate_forever()
    _collect(stream, 7)
    state = loader.state_dict()
    rest = _collect(stream, 20)  # crosses into the next epoch
    resumed = TensorDataLoader.from_cifar(train, **kwargs)
    resumed.load_state_dict(state)
    again = _collect(resumed.iterate_forever(), 20)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, again))
    assert resumed.epoch == 1
    first_epoch = [y for _, y in TensorDataLoader.from_cifar(train, **kwargs)]
    second = TensorDataLoader.from_cifar(train, **kwargs)
    second.load_state_dict({**state, "epoch": 1, "position": 0})
    assert not torch.equal(torch.cat(first_epoch), torch.cat([y for _, y in second]))  # reshuffled
    with pytest.raises(KcdError, match="batch_size"):
        TensorDataLoader.from_cifar(train, seed=5, batch_size=32).load_state_dict(state)


@pytest.mark.parametrize("world_size", [4, 3])
def test_distributed_shards_are_disjoint_and_cover_the_epoch(world_size):
    n = 1000
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    whole = TensorDataLoader(images, torch.arange(n), batch_size=100)
    single = {int(i): x for xs, ys in whole for x, i in zip(xs, ys)}
    shards = []
    for rank in range(world_size):
        loader = TensorDataLoader(
            images, torch.arange(n), batch_size=100, rank=rank, world_size=world_size
        )
        seen = []
        for xs, ys in loader:
            seen += ys.tolist()
            assert all(torch.equal(x, single[int(i)]) for x, i in zip(xs, ys))  # same augmentation
        shards.append(seen)
    assert len({len(s) for s in shards}) == 1  # equal work per rank
    everything = [i for s in shards for i in s]
    assert sorted(set(everything)) == list(range(n))
    assert len(everything) - n == (-n) % world_size  # only the padding repeats


def test_loader_rejects_bad_input():
    with pytest.raises(KcdError, match="uint8"):
        TensorDataLoader(torch.zeros(4, 3, 8, 8), torch.zeros(4))
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(KcdError, match="rank"):
        TensorDataLoader(images, torch.zeros(4), rank=2, world_size=2)
    with pytest.raises(KcdError, match="no batch"):
        TensorDataLoader(images, torch.zeros(4), batch_size=8, drop_last=True)
    with pytest.raises(KcdError, match="4 images and 3 labels"):
        TensorDataLoader(images, torch.zeros(3))


def test_normalisation_constants_are_shared():
    import kcd.data.datasets as datasets

    assert datasets.cifar100_transform(False).transforms[-1].mean == CIFAR100_MEAN
    assert datasets.cifar100_transform(False).transforms[-1].std == CIFAR100_STD


# --------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path):
    for name in ("cifar100", "imagenet", "coco"):
        with pytest.raises(KcdError, match=f"does not exist.*datasets.{name}.root"):
            build_dataset(name, tmp_path / "nope", "train")
    with pytest.raises(KcdError, match="unknown dataset"):
        build_dataset("mnist", tmp_path, "train")
    with pytest.raises(KcdError, match="unknown split"):
        build_dataset("imagenet", tmp_path, "test")


def test_wrong_format_roots(tmp_path, demo):
    with pytest.raises(KcdError, match="not a CIFAR-100 root.*cifar-100-python/train"):
        build_dataset("cifar100", tmp_path, "train")
    with pytest.raises(KcdError, match="not an ImageNet root"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.raises(KcdError, match="not a COCO root"):
        build_dataset("coco", tmp_path, "train")
    with pytest.raises(KcdError, match="not an ImageNet root"):  # the root one level too high
        build_dataset("imagenet", demo["imagenet"].parent, "train")
    broken = tmp_path / "cifar-100-python"
    broken.mkdir()
    for name in ("train", "test", "meta"):
        (broken / name).write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(KcdError, match="cifar-100-python/meta is not a CIFAR-100 python pickle: "
                                       "its top level is a list"):
        build_dataset("cifar100", tmp_path, "train")
    (broken / "meta").write_bytes((demo["cifar100"] / "cifar-100-python" / "meta").read_bytes())
    with pytest.raises(KcdError, match="cifar-100-python/train is not a CIFAR-100 python pickle: "
                                       "its top level is a list"):
        build_dataset("cifar100", tmp_path, "train")
    (broken / "train").write_bytes(b"not a pickle at all")
    with pytest.raises(KcdError, match="cifar-100-python/train is not a CIFAR-100 python pickle: "
                                       "it is truncated or damaged"):
        build_dataset("cifar100", tmp_path, "train")
    (broken / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.float32),
                                                 "fine_labels": [0, 1]}))
    with pytest.raises(KcdError, match="cifar-100-python/train .*'data' is ndarray float32"):
        build_dataset("cifar100", tmp_path, "train")


@pytest.fixture
def coco_copy(tmp_path, demo) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    os.symlink(demo["coco"] / "val2017", root / "val2017")
    (root / "annotations" / "instances_val2017.json").write_bytes(
        (demo["coco"] / "annotations" / "instances_val2017.json").read_bytes()
    )
    return root


def _edit_annotations(root: Path, edit) -> Path:
    path = root / "annotations" / "instances_val2017.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return path


def test_broken_coco_json(coco_copy):
    path = coco_copy / "annotations" / "instances_val2017.json"
    path.write_text("{ this is not json")
    with pytest.raises(KcdError, match="instances_val2017.json is not JSON"):
        build_dataset("coco", coco_copy, "val")
    path.write_text("[1, 2]")
    with pytest.raises(KcdError, match="instances_val2017.json is not a COCO detection file"):
        build_dataset("coco", coco_copy, "val")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(KcdError, match="not a COCO detection file: missing key.*categories"):
        build_dataset("coco", coco_copy, "val")


def test_coco_unknown_category(coco_copy):
    _edit_annotations(coco_copy, lambda d: d["annotations"][0].update(category_id=77))
    with pytest.raises(KcdError, match="instances_val2017.json.*category_id 77"):
        build_dataset("coco", coco_copy, "val")


def test_coco_without_categories_has_no_class_count(coco_copy):
    from kcd.data.datasets import num_classes

    _edit_annotations(coco_copy, lambda d: (d.update(categories=[]), d.update(annotations=[])))
    with pytest.raises(KcdError, match="instances_val2017.json lists no categories"):
        num_classes("coco", coco_copy)


def test_coco_missing_image(coco_copy):
    _edit_annotations(coco_copy, lambda d: d["images"][0].update(file_name="999999999999.jpg"))
    with pytest.raises(KcdError, match="999999999999.jpg.*is missing"):
        build_dataset("coco", coco_copy, "val")


def test_eval_batches_limit_takes_every_kth_image_across_all_classes(demo_root):
    from kcd.data.streams import eval_batches
    from kcd.specs import DataSpec

    data = DataSpec(name="imagenet", root=str(demo_root / "imagenet"), image_size=16)
    full = torch.cat([y for _, y in eval_batches(data, 5, split="train")])
    part = torch.cat([y for _, y in eval_batches(data, 5, split="train", limit=5)])
    assert len(part) <= 5 < len(full)
    assert torch.equal(part, full[::-(-len(full) // 5)])
    # ImageFolder stores classes in order: a strided subset still sees every class
    assert set(part.tolist()) == set(full.tolist())


# --------------------------------------------------------------------------- CIFAR-10, class counts


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    """A tiny demo CIFAR-10 root (holding cifar-10-batches-py/)."""
    written = write_demo_data(tmp_path_factory.mktemp("demo10"), seed=0, kinds=["cifar10"],
                              sizes=TINY, progress=False)
    return written["cifar10"]


def _copy(src_root: Path, folder: str, dst_root: Path) -> Path:
    """A private copy of ``src_root/folder`` under ``dst_root``; returns ``dst_root/folder``."""
    shutil.copytree(src_root / folder, dst_root / folder)
    return dst_root / folder


def test_default_demo_kinds_do_not_include_cifar10(demo):
    assert set(demo) == {"cifar100", "imagenet", "coco"}
    assert not (demo["cifar100"] / "cifar-10-batches-py").exists()


def test_cifar10_demo_has_the_cifar10_layout(cifar10_root):
    folder = cifar10_root / "cifar-10-batches-py"
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*batches, "test_batch", "batches.meta", MANIFEST]
    )
    counts = np.zeros(10, dtype=int)
    for name in batches:
        with open(folder / name, "rb") as f:  # as the CIFAR web page reads it
            raw = pickle.load(f, encoding="bytes")
        assert set(raw) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (10, 3072)
        counts += np.bincount(raw[b"labels"], minlength=10)
    assert counts.tolist() == [TINY.cifar10_train_per_class] * 10
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["label_names"]) == 10 and meta["num_vis"] == 3072


def test_cifar10_demo_is_what_torchvision_reads(cifar10_root, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # torchvision's own reading code, with only its md5 comparison switched off
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    for train in (True, False):
        ours = LocalCIFAR10(str(cifar10_root), train=train)
        theirs = tv_cifar.CIFAR10(str(cifar10_root), train=train)
        assert np.array_equal(ours.data, theirs.data) and ours.targets == theirs.targets
        assert ours.classes == theirs.classes and len(ours.classes) == 10
    image, label = ours[0]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label < 10


def test_cifar10_through_the_registry_and_both_loaders(cifar10_root):
    from kcd.data.streams import SampleStream, eval_batches, train_stream
    from kcd.specs import DataSpec

    assert "cifar10" in DATASETS
    train = build_dataset("cifar10", cifar10_root, "train")
    test = build_dataset("cifar10", cifar10_root, "val")
    assert isinstance(train, LocalCIFAR10) and len(train) == 10 * TINY.cifar10_train_per_class
    assert len(test) == 10 * TINY.cifar10_test_per_class
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert num_classes("cifar10", cifar10_root) == 10
    assert check_num_classes("cifar10", cifar10_root, 10) == 10

    fast = DataSpec(name="cifar10", root=str(cifar10_root), fast_loader=True)
    slow = DataSpec(name="cifar10", root=str(cifar10_root), fast_loader=False)
    fast_stream, slow_stream = train_stream(fast, 8, seed=1), train_stream(slow, 8, seed=1)
    assert isinstance(fast_stream, TensorDataLoader) and isinstance(slow_stream, SampleStream)
    for stream in (fast_stream, slow_stream):
        xb, yb = next(stream.iterate_forever())
        assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32
        assert yb.dtype == torch.int64 and bool(((yb >= 0) & (yb < 10)).all())
    fast_eval, slow_eval = list(eval_batches(fast, 7)), list(eval_batches(slow, 7))
    assert isinstance(eval_batches(fast, 7), TensorDataLoader)
    assert len(fast_eval) == len(slow_eval)
    for (xf, yf), (xs, ys) in zip(fast_eval, slow_eval):
        # the fast path normalises with CIFAR-10's constants, exactly as the standard transform
        assert torch.equal(xf, xs) and torch.equal(yf, ys)
    normalize = test.transform.transforms[-1]
    assert (normalize.mean, normalize.std) == (CIFAR10_MEAN, CIFAR10_STD)


def test_cifar10_missing_file(tmp_path, cifar10_root):
    folder = _copy(cifar10_root, "cifar-10-batches-py", tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(KcdError, match="not a CIFAR-10 root: .*data_batch_4 is missing.*"
                                       "datasets.cifar10.root"):
        build_dataset("cifar10", tmp_path, "train")


def _rewrite_cifar100_with_20_classes(root: Path, demo_root: Path, labels_mod: int = 20) -> Path:
    """A CIFAR-100-format folder whose meta lists 20 classes (labels modulo ``labels_mod``)."""
    from kcd.data.demo import _dump_python2

    folder = _copy(demo_root, "cifar-100-python", root)
    for split in ("train", "test"):
        with open(folder / split, "rb") as f:
            raw = pickle.load(f, encoding="bytes")
        raw[b"fine_labels"] = [y % labels_mod for y in raw[b"fine_labels"]]
        _dump_python2(raw, folder / split)
    _dump_python2({b"fine_label_names": [f"c{i}".encode() for i in range(20)],
                   b"coarse_label_names": [b"all"]}, folder / "meta")
    return folder


def test_cifar100_format_class_count_comes_from_meta(tmp_path, demo):
    _rewrite_cifar100_with_20_classes(tmp_path, demo["cifar100"])
    train = build_dataset("cifar100", tmp_path, "train")
    assert len(train.classes) == 20 and max(train.targets) == 19
    assert len(train) == 100 * TINY.cifar_train_per_class
    assert num_classes("cifar100", tmp_path) == 20
    assert check_num_classes("cifar100", tmp_path, 20) == 20
    from kcd.data.streams import train_stream
    from kcd.specs import DataSpec

    xb, yb = next(train_stream(DataSpec(name="cifar100", root=str(tmp_path)), 16).iterate_forever())
    assert xb.shape == (16, 3, 32, 32) and int(yb.max()) < 20


def test_label_outside_the_meta_classes_names_the_file(tmp_path, demo):
    _rewrite_cifar100_with_20_classes(tmp_path, demo["cifar100"], labels_mod=100)
    with pytest.raises(KcdError, match=r"cifar-100-python/test is not a CIFAR-100 python pickle: "
                                       r"it has label \d+, outside 0\.\.19 for the 20 classes"):
        build_dataset("cifar100", tmp_path, "test")


def test_num_classes_mismatch_names_the_config_key(tmp_path, demo, cifar10_root):
    with pytest.raises(KcdError) as e:
        check_num_classes("cifar10", cifar10_root, 100)
    meta = cifar10_root / "cifar-10-batches-py" / "batches.meta"
    assert str(e.value) == (f"config key datasets.cifar10.num_classes is 100 but {meta} lists 10 "
                            "classes; set it to 10")
    _rewrite_cifar100_with_20_classes(tmp_path, demo["cifar100"])
    with pytest.raises(KcdError, match=r"^config key datasets\.cifar100\.num_classes is 100 but "
                                       r".*cifar-100-python/meta lists 20 classes; set it to 20$"):
        check_num_classes("cifar100", tmp_path, 100)
    assert check_num_classes("cifar100", demo["cifar100"], 100) == 100
    with pytest.raises(KcdError, match=r"datasets\.imagenet\.num_classes is 10 but .*/train has "
                                       f"{TINY.imagenet_classes} class folders; set it to "
                                       f"{TINY.imagenet_classes}$"):
        check_num_classes("imagenet", demo["imagenet"], 10)
    coco_classes = TINY.coco_categories + 1
    assert check_num_classes("coco", demo["coco"], coco_classes) == coco_classes
    with pytest.raises(KcdError,
                       match=rf"datasets\.coco\.num_classes is 91 .*set it to {coco_classes}$"):
        check_num_classes("coco", demo["coco"], 91)
    with pytest.raises(KcdError, match="does not exist.*datasets.cifar10.root"):
        check_num_classes("cifar10", tmp_path / "nope", 10)
    with pytest.raises(KcdError, match="not a CIFAR-10 root: .*batches.meta is missing"):
        check_num_classes("cifar10", tmp_path, 10)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsPython:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


CIFAR_FILES = [  # (dataset, folder, file, the split that reads it)
    ("cifar10", "cifar-10-batches-py", "batches.meta", "test"),
    ("cifar10", "cifar-10-batches-py", "data_batch_3", "train"),
    ("cifar10", "cifar-10-batches-py", "test_batch", "test"),
    ("cifar100", "cifar-100-python", "meta", "test"),
    ("cifar100", "cifar-100-python", "train", "train"),
    ("cifar100", "cifar-100-python", "test", "test"),
]


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython])
@pytest.mark.parametrize("dataset, folder, name, split", CIFAR_FILES)
def test_code_in_a_cifar_pickle_is_never_run(tmp_path, demo, cifar10_root, payload, dataset,
                                             folder, name, split):
    source = cifar10_root if dataset == "cifar10" else demo["cifar100"]
    root = tmp_path / "root"
    copy = _copy(source, folder, root)
    marker = tmp_path / "marker"
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "label_names": ["a"],
            "fine_labels": [0], "fine_label_names": ["a"], "x": payload(marker)}
    (copy / name).write_bytes(pickle.dumps(evil, protocol=2))
    # protocol 2 writes Python 2 module names: exec is __builtin__.exec
    called = f"{os.system.__module__}.system" if payload is _RunsShell else "__builtin__.exec"
    reads = [lambda: build_dataset(dataset, root, split)]
    if name in ("meta", "batches.meta"):  # the class count reads only the metadata file
        reads.append(lambda: check_num_classes(dataset, root, 10))
    for read in reads:
        with pytest.raises(KcdError) as e:
            read()
        message = str(e.value)
        assert message.startswith(f"{copy / name} is not a ") and f"refers to {called}" in message
        assert "\n" not in message
    assert not marker.exists()
    control = tmp_path / "control"  # the payload is real: the standard unpickler runs it
    pickle.loads(pickle.dumps(payload(control), protocol=2))
    assert control.exists()


@pytest.mark.parametrize("dataset, folder, name, split", CIFAR_FILES)
def test_truncated_cifar_pickle_is_one_line_error_naming_the_file(tmp_path, demo, cifar10_root,
                                                                  dataset, folder, name, split):
    source = cifar10_root if dataset == "cifar10" else demo["cifar100"]
    copy = _copy(source, folder, tmp_path)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(KcdError) as e:
        build_dataset(dataset, tmp_path, split)
    message = str(e.value)
    assert message.startswith(f"{copy / name} is not a CIFAR-1")
    assert "truncated or damaged" in message and "\n" not in message


def test_cifar_files_resaved_by_python3_or_written_by_numpy1_are_read(tmp_path, cifar10_root):
    folder = _copy(cifar10_root, "cifar-10-batches-py", tmp_path)
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    expected = LocalCIFAR10(str(cifar10_root), train=False)
    # Python 3, default protocol: str keys, numpy labels (numpy._core.numeric._frombuffer, scalar)
    resaved = {"data": entry[b"data"], "labels": np.asarray(entry[b"labels"], dtype=np.int64)}
    (folder / "test_batch").write_bytes(pickle.dumps(resaved))
    again = LocalCIFAR10(str(tmp_path), train=False)
    assert np.array_equal(again.data, expected.data) and again.targets == expected.targets
    # protocol 2 under Python 3 (_codecs.encode), referring to numpy 1's module names as the
    # official files do
    old = pickle.dumps({"data": entry[b"data"], "labels": entry[b"labels"]}, protocol=2)
    old = old.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in old and b"_codecs\nencode" in old
    (folder / "test_batch").write_bytes(old)
    again = LocalCIFAR10(str(tmp_path), train=False)
    assert np.array_equal(again.data, expected.data) and again.targets == expected.targets


def test_cifar_unpickler_allows_only_data(tmp_path):
    allowed = {f"{module}.{name}" for module, name in CIFAR_PICKLE_GLOBALS}
    assert "numpy.core.multiarray._reconstruct" in allowed
    assert "numpy._core.multiarray._reconstruct" in allowed
    assert {"numpy.ndarray", "numpy.dtype", "builtins.dict", "builtins.list"} <= allowed
    for dangerous in ("builtins.eval", "builtins.exec", "builtins.getattr", "builtins.__import__",
                      "posix.system", "os.system", "subprocess.Popen", "copyreg._reconstructor",
                      "numpy.load", "_codecs.lookup"):
        assert dangerous not in allowed
    crafted = tmp_path / "crafted"
    # _codecs.encode("a", "zlib"): only the latin-1 text encoding of Python 3 protocol-2 pickles
    crafted.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(KcdError, match="crafted is not a CIFAR python pickle: .*_codecs.encode with "
                                       "encoding 'zlib'"):
        load_cifar_pickle(crafted)
    crafted.write_bytes(pickle.dumps({"data": 1}, protocol=2))
    assert load_cifar_pickle(crafted) == {"data": 1}
