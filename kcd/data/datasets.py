"""The datasets of the paper, read from local folders in their standard on-disk formats.

``DATASETS`` maps a name to a builder ``(root, split, train_transform, image_size, download)``;
:func:`build_dataset` looks one up and turns format problems into one-line :class:`KcdError`\\ s.

========  =================================  ======================  ==========================
name      ``root`` contains                  splits                  item
========  =================================  ======================  ==========================
cifar100  ``cifar-100-python/{train,test,    ``train``, ``test``     (normalised tensor, label)
          meta}`` (python pickles)           (``val`` = ``test``)
imagenet  ``{train,val}/<class>/<image>``    ``train``, ``val``      (normalised tensor, label)
coco      ``{train,val}2017/*.jpg``,         ``train``, ``val``      (PIL image, annotations)
          ``annotations/instances_*.json``
========  =================================  ======================  ==========================

The demo data written by :func:`kcd.data.demo.write_demo_data` has exactly these layouts.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100, CocoDetection, ImageFolder

from kcd.errors import KcdError
from kcd.registry import Registry

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_PADDING = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_IMAGE_SIZE = 224

DatasetBuilder = Callable[[Path, str, bool, int | None, bool], Dataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def build_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    train_transform: bool | None = None,
    image_size: int | None = None,
    download: bool = False,
) -> Dataset:
    """Build dataset ``name`` from ``root`` for ``split``.

    ``train_transform`` selects the training augmentation (default: on for the ``train`` split
    only); ``image_size`` is the ImageNet crop size (default 224; the demo uses 64); ``download``
    lets torchvision fetch the real CIFAR-100 into ``root`` (cluster use; never done by default).
    COCO items are raw ``(PIL image, annotation list)`` pairs: see :func:`coco_target_to_tensors`.
    """
    builder = DATASETS.get(name)
    root = Path(root)
    if not root.is_dir() and not download:
        raise KcdError(
            f"dataset root {root} does not exist; run `kcd demo-data` "
            f"or set datasets.{name}.root in the config"
        )
    if train_transform is None:
        train_transform = split == "train"
    return builder(root, split, train_transform, image_size, download)


def num_classes(name: str, root: str | os.PathLike) -> int:
    """Number of classes of dataset ``name`` at ``root``.

    For ``coco`` this is what a torchvision detector takes as ``num_classes``: the largest category
    id plus one, label 0 being the background.
    """
    if name == "cifar100":
        return len(build_dataset(name, root, "test").classes)
    if name == "imagenet":
        return len(build_dataset(name, root, "val").classes)
    dataset = build_dataset(name, root, "val")
    return max(dataset.coco.getCatIds()) + 1


def _check_split(name: str, split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise KcdError(f"unknown split '{split}' for dataset {name}; known: {', '.join(known)}")


# --------------------------------------------------------------------------- cifar100


class LocalCIFAR100(CIFAR100):
    """torchvision's ``CIFAR100`` without the md5 comparison of the files.

    torchvision compares each file against the md5 of the official CIFAR-100 release, which the
    demo files (same pickle layout, synthetic images) cannot match. This subclass checks only that
    the files exist; reading, decoding and ``download`` are torchvision's own code. The real
    CIFAR-100 reads the same either way. One consequence: ``download=True`` does not replace
    existing but corrupted files; delete them first.
    """

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [name for name, _md5 in self.train_list + self.test_list]
        return all(os.path.isfile(os.path.join(folder, name)) for name in names)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"CIFAR-100 metadata file {path} not found")
        with open(path, "rb") as infile:
            data = pickle.load(infile, encoding="latin1")
            self.classes = data[self.meta["key"]]
        self.class_to_idx = {_class: i for i, _class in enumerate(self.classes)}


def cifar100_transform(train: bool) -> T.Compose:
    """The standard CIFAR transform: pad-4 random crop and flip for training, then normalise."""
    augment = [T.RandomCrop(32, padding=CIFAR_PADDING), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*augment, T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])


@DATASETS.register("cifar100")
def _cifar100(
    root: Path, split: str, train_transform: bool, image_size: int | None, download: bool
) -> LocalCIFAR100:
    """CIFAR-100 train or test split (``val`` means ``test``); ``image_size`` does not apply."""
    _check_split("cifar100", split, ("train", "test", "val"))
    folder = root / LocalCIFAR100.base_folder
    if not download:
        missing = [n for n in ("train", "test", "meta") if not (folder / n).is_file()]
        if missing:
            raise KcdError(
                f"{root} is not a CIFAR-100 root: {folder}/{missing[0]} is missing; point "
                "datasets.cifar100.root at the folder containing cifar-100-python/ "
                "or run `kcd demo-data`"
            )
    try:
        dataset = LocalCIFAR100(
            str(root),
            train=split == "train",
            transform=cifar100_transform(train_transform),
            download=download,
        )
    except (
        pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError
    ) as e:
        raise KcdError(
            f"{folder} does not hold CIFAR-100 python pickles ({type(e).__name__}: {e}); "
            "replace it with the real cifar-100-python/ folder or rerun `kcd demo-data`"
        ) from None
    labels = torch.as_tensor(dataset.targets)
    if len(labels) != len(dataset.data) or len(dataset.classes) != 100 or not bool(
        ((labels >= 0) & (labels < 100)).all()
    ):
        raise KcdError(
            f"{folder} is not CIFAR-100: expected 100 classes and one label in 0..99 per image; "
            "replace it with the real cifar-100-python/ folder or rerun `kcd demo-data`"
        )
    return dataset


# --------------------------------------------------------------------------- imagenet


def imagenet_transform(train: bool, image_size: int = IMAGENET_IMAGE_SIZE) -> T.Compose:
    """The standard ImageNet transform at ``image_size``: random-resized crop and flip for
    training, resize to 256/224 of the size and centre crop for evaluation; then normalise."""
    if train:
        geometry = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir()) if folder.is_dir() else []


@DATASETS.register("imagenet")
def _imagenet(
    root: Path, split: str, train_transform: bool, image_size: int | None, download: bool
) -> ImageFolder:
    """An ImageNet-style ``ImageFolder`` split; ``image_size`` defaults to 224."""
    _check_split("imagenet", split, ("train", "val"))
    if download:
        raise KcdError(
            "ImageNet cannot be downloaded automatically; set datasets.imagenet.download to false"
        )
    train_classes, split_classes = _class_folders(root / "train"), _class_folders(root / split)
    if not train_classes or not split_classes:
        raise KcdError(
            f"{root} is not an ImageNet root: expected class folders in {root}/train/ and "
            f"{root}/val/; set datasets.imagenet.root to such a folder or run `kcd demo-data`"
        )
    if split_classes != train_classes:
        raise KcdError(
            f"{root}/{split} has {len(split_classes)} class folders but {root}/train has "
            f"{len(train_classes)} different ones; both splits need the same class folders"
        )
    try:
        transform = imagenet_transform(train_transform, image_size or IMAGENET_IMAGE_SIZE)
        return ImageFolder(str(root / split), transform=transform)
    except FileNotFoundError as e:
        raise KcdError(f"{root}/{split} is not an image folder tree: {e}".rstrip()) from None


# --------------------------------------------------------------------------- coco


class CheckedCocoDetection(CocoDetection):
    """torchvision's ``CocoDetection``, checked at construction.

    Fails with :class:`KcdError` naming the file when the annotation file is not COCO detection
    JSON, an annotation names a category or image that is not listed, or a listed image is
    missing from ``root``. pycocotools' progress prints are silenced.
    """

    def __init__(
        self, root: str | os.PathLike, ann_file: str | os.PathLike, transforms: Callable | None = None
    ) -> None:
        if not os.path.isfile(ann_file):
            raise KcdError(
                f"COCO annotation file {ann_file} does not exist; "
                "run `kcd demo-data` or fix datasets.coco.root"
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                super().__init__(str(root), str(ann_file), transforms=transforms)
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise KcdError(f"COCO annotation file {ann_file} is not JSON ({e}); replace it") from None
        except AssertionError:  # pycocotools asserts that the top level is an object
            raise KcdError(
                f"COCO annotation file {ann_file} is not a COCO detection file "
                "(its top level is not an object)"
            ) from None
        except (KeyError, TypeError) as e:
            raise KcdError(
                f"COCO annotation file {ann_file} is not a COCO detection file "
                f"(bad entry: {type(e).__name__} {e})"
            ) from None
        self._check(Path(root), Path(ann_file))

    def _check(self, root: Path, ann_file: Path) -> None:
        missing_keys = [k for k in ("images", "annotations", "categories") if k not in self.coco.dataset]
        if missing_keys:
            raise KcdError(
                f"{ann_file} is not a COCO detection file: missing key(s) {', '.join(missing_keys)}"
            )
        categories, images = set(self.coco.cats), set(self.coco.imgs)
        for ann in self.coco.dataset["annotations"]:
            if ann.get("category_id") not in categories:
                raise KcdError(
                    f"{ann_file}: annotation {ann.get('id')} has category_id "
                    f"{ann.get('category_id')!r}, which is not among the categories {sorted(categories)}"
                )
            if ann.get("image_id") not in images:
                raise KcdError(
                    f"{ann_file}: annotation {ann.get('id')} refers to unknown image_id "
                    f"{ann.get('image_id')!r}"
                )
            if len(ann.get("bbox", ())) != 4:
                raise KcdError(
                    f"{ann_file}: annotation {ann.get('id')} needs a bbox [x, y, width, height]"
                )
        on_disk = set(os.listdir(root)) if root.is_dir() else set()
        for image in self.coco.dataset["images"]:
            if image.get("file_name") not in on_disk:
                raise KcdError(
                    f"image {root / str(image.get('file_name'))} listed in {ann_file} is missing; "
                    "restore it or regenerate the data"
                )


def coco_target_to_tensors(
    annotations: list[dict[str, Any]], image_id: int
) -> dict[str, torch.Tensor]:
    """Convert COCO annotations of one image into a torchvision detection target.

    Returns ``boxes`` (float, ``[x0, y0, x1, y1]``), ``labels`` (long, the COCO ``category_id``:
    0 stays free for the background) and ``image_id``. Crowd regions are left out, as is usual
    for training.
    """
    kept = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {
        "boxes": boxes,
        "labels": torch.tensor([a["category_id"] for a in kept], dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
    }


@DATASETS.register("coco")
def _coco(
    root: Path, split: str, train_transform: bool, image_size: int | None, download: bool
) -> CheckedCocoDetection:
    """COCO 2017 detection: raw (PIL image, annotations) pairs; augmentation and resizing belong
    to the detector, so ``train_transform`` and ``image_size`` do not apply."""
    _check_split("coco", split, ("train", "val"))
    if download:
        raise KcdError(
            "COCO cannot be downloaded automatically; set datasets.coco.download to false"
        )
    image_dir = root / f"{split}2017"
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    if not image_dir.is_dir():
        raise KcdError(
            f"{root} is not a COCO root: {image_dir} is missing; set datasets.coco.root to the "
            "folder holding train2017/, val2017/ and annotations/, or run `kcd demo-data`"
        )
    return CheckedCocoDetection(image_dir, ann_file)
