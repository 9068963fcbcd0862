"""Tests of kcd.data: demo data in the real formats, the dataset registry, the tensor loader."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from pycocotools.coco import COCO
from torchvision.datasets import CIFAR100, CocoDetection, ImageFolder

from kcd.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DemoSizes,
    LocalCIFAR100,
    TensorDataLoader,
    build_dataset,
    coco_target_to_tensors,
    num_classes,
    write_demo_data,
)
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


def test_classes_are_distinguishable_but_not_trivially(tmp_path):
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
    assert 0.15 < accuracy < 0.8, accuracy  # chance is 0.01


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
    with pytest.raises(KcdError, match="does not hold CIFAR-100 python pickles"):
        build_dataset("cifar100", tmp_path, "train")
    (broken / "train").write_bytes(b"not a pickle at all")
    with pytest.raises(KcdError, match="does not hold CIFAR-100 python pickles"):
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
