"""The datasets of the paper, read from local folders in their standard on-disk formats.

:data:`kcd.data.DATASETS` maps a name to its builder here ``(root, split, train_transform,
image_size, download)`` and its task; :func:`build_dataset` looks one up and turns format problems into one-line :class:`KcdError`\\ s.

========  =================================  ======================  ==========================
name      ``root`` contains                  splits                  item
========  =================================  ======================  ==========================
cifar10   ``cifar-10-batches-py/{data_batch  ``train``, ``test``     (normalised tensor, label)
          _1..5,test_batch,batches.meta}``   (``val`` = ``test``)
cifar100  ``cifar-100-python/{train,test,    ``train``, ``test``     (normalised tensor, label)
          meta}`` (python pickles)           (``val`` = ``test``)
imagenet  ``{train,val}/<class>/<image>``    ``train``, ``val``      (normalised tensor, label)
coco      ``{train,val}2017/*.jpg``,         ``train``, ``val``      (PIL image, annotations)
          ``annotations/instances_*.json``
========  =================================  ======================  ==========================

CIFAR pickles are read by a restricted unpickler (:class:`CIFARUnpickler`): data only, never code.
The class count is the data's (the metadata file's class names, the ImageNet class folders, COCO's
largest category id plus one); :func:`check_num_classes` compares it with a configured one.
The demo data written by :func:`kcd.data.demo.write_demo_data` has exactly these layouts.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100, CocoDetection, ImageFolder
from torchvision.datasets.vision import VisionDataset

from kcd.errors import KcdError
from kcd.data import DATASETS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_PADDING = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_IMAGE_SIZE = 224



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
    return builder.build(root, split, train_transform, image_size, download)


def num_classes(name: str, root: str | os.PathLike) -> int:
    """Number of classes of dataset ``name`` at ``root``, as the data says.

    CIFAR: the class names of the metadata file (only that file is read); ImageNet: the class
    folders of ``train/``; ``coco``: what a torchvision detector takes as ``num_classes``, the
    largest category id plus one, label 0 being the background.
    """
    return _class_count(name, root)[0]


def check_num_classes(name: str, root: str | os.PathLike, configured: int) -> int:
    """Check that ``configured`` (``datasets.<name>.num_classes``) is the class count of the data
    at ``root`` and return it; else raise a one-line :class:`KcdError` naming the config key, the
    file or folder the count comes from, and the value to set."""
    actual, source = _class_count(name, root)
    if configured != actual:
        raise KcdError(
            f"config key datasets.{name}.num_classes is {configured} but {source}; "
            f"set it to {actual}"
        )
    return actual


def _class_count(name: str, root: str | os.PathLike) -> tuple[int, str]:
    """(class count of dataset ``name`` at ``root``, where that count comes from, as words)."""
    DATASETS.get(name)  # unknown names fail here, listing the known ones
    root = Path(root)
    if not root.is_dir():
        raise KcdError(
            f"dataset root {root} does not exist; run `kcd demo-data` "
            f"or set datasets.{name}.root in the config"
        )
    if name in CIFAR_READERS:
        reader = CIFAR_READERS[name]
        path = root / reader.base_folder / reader.meta["filename"]
        if not path.is_file():
            raise KcdError(
                f"{root} is not a {reader.format_name} root: {path} is missing; point "
                f"datasets.{name}.root at the folder containing {reader.base_folder}/ "
                "or run `kcd demo-data`"
            )
        count = len(read_cifar_meta(path, reader.meta["key"], reader.format_name))
        return count, f"{path} lists {count} classes"
    if name == "imagenet":
        classes = _class_folders(root / "train")
        if not classes:
            raise KcdError(
                f"{root} is not an ImageNet root: expected class folders in {root}/train/; "
                "set datasets.imagenet.root to such a folder or run `kcd demo-data`"
            )
        return len(classes), f"{root}/train has {len(classes)} class folders"
    if name != "coco":
        raise KcdError(f"kcd does not know how to count the classes of dataset {name}")
    dataset = build_dataset(name, root, "val")
    ids = dataset.coco.getCatIds()  # type: ignore[attr-defined]
    if not ids:
        raise KcdError(f"{root}/annotations/instances_val2017.json lists no categories; a COCO "
                       "annotation file needs its 'categories'")
    largest = max(ids)
    return largest + 1, (
        f"the largest category id in {root}/annotations/instances_val2017.json is {largest} "
        "(a detector takes that plus one, for the background)"
    )


def _check_split(name: str, split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise KcdError(f"unknown split '{split}' for dataset {name}; known: {', '.join(known)}")


# --------------------------------------------------------------------------- cifar10 / cifar100


def _numpy_helpers() -> dict[tuple[str, str], Any]:
    """The numpy callables that pickled arrays and scalars refer to, under numpy 1 and 2 names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26 has no numpy._core
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes under protocol 2, limited to latin-1."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_BUILTINS = (dict, list, tuple, set, frozenset, str, bytes, bytearray, int, float, complex, bool)
CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, t.__name__): t for module in ("builtins", "__builtin__") for t in _BUILTINS},
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_helpers(),
}


class CIFARUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR python files that builds data, never runs code.

    ``find_class`` hands out only what the format needs (:data:`CIFAR_PICKLE_GLOBALS`: builtin
    containers, numbers and strings, and numpy's array/dtype/scalar reconstruction helpers); any
    other global (``os.system``, ``subprocess.Popen``, ...) raises :class:`KcdError` naming the
    file before anything is called.
    """

    def __init__(self, file: Any, path: str | os.PathLike, what: str = "CIFAR") -> None:
        super().__init__(file, encoding="latin1")  # as torchvision reads the Python 2 files
        self.path, self.what = path, what

    def find_class(self, module: str, name: str) -> Any:
        found = CIFAR_PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise KcdError(
                f"{self.path} is not a {self.what} python pickle: it refers to {module}.{name}, "
                "which the format never needs, so it was not loaded (nothing in it ran); replace "
                "it with the file from the official archive or rerun `kcd demo-data`"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of the format")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def load_cifar_pickle(path: str | os.PathLike, what: str = "CIFAR") -> Any:
    """Unpickle one CIFAR python file (a batch or the metadata) with :class:`CIFARUnpickler`.

    Python 2 strings come back as ``str`` (``encoding="latin1"``, as torchvision reads them).
    A file that refers to anything but data, or is truncated or not a pickle, raises a one-line
    :class:`KcdError` naming it; ``what`` names the format in that message (``"CIFAR-10"``...).
    """
    try:
        with open(path, "rb") as f:
            return CIFARUnpickler(f, path, what).load()
    except KcdError:
        raise
    except OSError as e:
        raise KcdError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - any failure to decode is a damaged file
        raise KcdError(
            f"{path} is not a {what} python pickle: it is truncated or damaged ({_one_line(e)}); "
            "replace it with the file from the official archive or rerun `kcd demo-data`"
        ) from None


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _as_dict(entry: Any, path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The top-level dict of a CIFAR file, keys as ``str`` (also for files re-saved by Python 3)."""
    if not isinstance(entry, dict):
        raise _layout_error(path, what, f"its top level is a {type(entry).__name__}, not a dict")
    return {_text(k): v for k, v in entry.items()}


def _layout_error(path: str | os.PathLike, what: str, problem: str) -> KcdError:
    return KcdError(
        f"{path} is not a {what} python pickle: {problem}; replace it with the file from the "
        "official archive or rerun `kcd demo-data`"
    )


def read_cifar_meta(path: str | os.PathLike, key: str, what: str = "CIFAR") -> list[str]:
    """The class names listed under ``key`` in the CIFAR metadata file ``path``: ``label_names``
    in CIFAR-10's ``batches.meta``, ``fine_label_names`` in CIFAR-100's ``meta``."""
    meta = _as_dict(load_cifar_pickle(path, what), path, what)
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names:
        raise _layout_error(path, what, f"it has no list of class names under '{key}'")
    names = [_text(n) for n in names]
    if not all(isinstance(n, str) for n in names):
        raise _layout_error(path, what, f"'{key}' holds something other than class names")
    return names


def read_cifar_batch(
    path: str | os.PathLike, num_classes: int, what: str = "CIFAR"
) -> tuple[np.ndarray, list[int]]:
    """``(images N x 3072 uint8, labels)`` of one CIFAR batch file, checked against the format:
    a dict with ``data`` (R, G, B planes of 32x32 images, one row per image) and one label in
    ``0..num_classes-1`` per image (``labels`` in CIFAR-10, ``fine_labels`` in CIFAR-100)."""
    entry = _as_dict(load_cifar_pickle(path, what), path, what)
    label_key = "labels" if "labels" in entry else "fine_labels"  # as torchvision picks it
    data, labels = entry.get("data"), entry.get(label_key)
    if data is None or labels is None:
        missing = "data" if data is None else "labels/fine_labels"
        raise _layout_error(path, what, f"it has no '{missing}' entry")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
        data.shape[1] != 3 * 32 * 32
    ):
        found = (
            f"{type(data).__name__} {data.dtype} {tuple(data.shape)}"
            if isinstance(data, np.ndarray) else type(data).__name__
        )
        raise _layout_error(path, what, f"'data' is {found}, not a uint8 N x 3072 array")
    if len(data) == 0:
        raise _layout_error(path, what, "it holds no images")
    try:
        label_array = np.asarray(labels)
    except (TypeError, ValueError):
        label_array = np.asarray([], dtype=object)
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer) or (
        len(label_array) != len(data)
    ):
        raise _layout_error(
            path, what, f"it needs one integer label per image ({len(data)} images)"
        )
    bad = label_array[(label_array < 0) | (label_array >= num_classes)]
    if len(bad):
        raise _layout_error(
            path, what, f"it has label {int(bad[0])}, outside 0..{num_classes - 1} "
            f"for the {num_classes} classes of its metadata file"
        )
    return data, label_array.tolist()


class _CheckedCIFAR:
    """What :class:`LocalCIFAR10` and :class:`LocalCIFAR100` change in torchvision's readers.

    - The md5 comparison with the official release is replaced by a check that the files exist
      (the demo files have the same layout but synthetic images, so they cannot match).
    - Every pickle is read with :class:`CIFARUnpickler` (data only, never code) and checked
      against the format; problems are one-line :class:`KcdError`\\ s naming the file.
    - The class count comes from the metadata file: a folder in the same format with other
      classes (e.g. 20) is read as such.

    The result is the torchvision object (``data`` N x 32 x 32 x 3 uint8, ``targets``, ``classes``,
    ``class_to_idx``, PIL items); ``download`` is torchvision's own (it does not replace existing
    but corrupted files: delete them first).
    """

    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]
    format_name = "CIFAR"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
    ) -> None:
        VisionDataset.__init__(  # type: ignore[arg-type]
            self, root, transform=transform, target_transform=target_transform
        )
        self.train = train
        if download:
            self.download()  # type: ignore[attr-defined]
        missing = self._missing()
        if missing:
            raise KcdError(
                f"{self.format_name} file {missing[0]} is missing; use the folder that contains "
                f"{self.base_folder}/ as root, download=True, or `kcd demo-data`"
            )
        self._load_meta()
        data, targets = [], []
        for name, _md5 in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, name)  # type: ignore[attr-defined]
            images, labels = read_cifar_batch(path, len(self.classes), self.format_name)
            data.append(images)
            targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self.targets = targets

    def _missing(self) -> list[str]:
        folder = os.path.join(self.root, self.base_folder)  # type: ignore[attr-defined]
        names = [n for n, _md5 in self.train_list + self.test_list] + [self.meta["filename"]]
        paths = [os.path.join(folder, n) for n in names]
        return [path for path in paths if not os.path.isfile(path)]

    def _check_integrity(self) -> bool:
        return not self._missing()

    def _load_meta(self) -> None:
        folder = os.path.join(self.root, self.base_folder)  # type: ignore[attr-defined]
        path = os.path.join(folder, self.meta["filename"])
        self.classes = read_cifar_meta(path, self.meta["key"], self.format_name)
        self.class_to_idx = {_class: i for i, _class in enumerate(self.classes)}


class LocalCIFAR10(_CheckedCIFAR, CIFAR10):
    """torchvision's ``CIFAR10`` reading ``cifar-10-batches-py/`` without the md5 comparison,
    through the restricted unpickler (see :class:`_CheckedCIFAR`)."""

    format_name = "CIFAR-10"
    mean, std = CIFAR10_MEAN, CIFAR10_STD


class LocalCIFAR100(_CheckedCIFAR, CIFAR100):
    """torchvision's ``CIFAR100`` reading ``cifar-100-python/`` without the md5 comparison,
    through the restricted unpickler (see :class:`_CheckedCIFAR`)."""

    format_name = "CIFAR-100"
    mean, std = CIFAR100_MEAN, CIFAR100_STD


CIFAR_READERS: dict[str, type[_CheckedCIFAR]] = {"cifar10": LocalCIFAR10, "cifar100": LocalCIFAR100}


def cifar_transform(
    train: bool, mean: tuple[float, ...] = CIFAR100_MEAN, std: tuple[float, ...] = CIFAR100_STD
) -> T.Compose:
    """The standard CIFAR transform: pad-4 random crop and flip for training, then normalise."""
    augment = [T.RandomCrop(32, padding=CIFAR_PADDING), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*augment, T.ToTensor(), T.Normalize(mean, std)])


def cifar100_transform(train: bool) -> T.Compose:
    """:func:`cifar_transform` with CIFAR-100's normalisation."""
    return cifar_transform(train, CIFAR100_MEAN, CIFAR100_STD)


def cifar10_transform(train: bool) -> T.Compose:
    """:func:`cifar_transform` with CIFAR-10's normalisation."""
    return cifar_transform(train, CIFAR10_MEAN, CIFAR10_STD)


def _cifar(
    name: str, root: Path, split: str, train_transform: bool, download: bool
) -> _CheckedCIFAR:
    reader = CIFAR_READERS[name]
    _check_split(name, split, ("train", "test", "val"))
    folder = root / reader.base_folder
    if not download:
        names = [n for n, _md5 in reader.train_list + reader.test_list] + [reader.meta["filename"]]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise KcdError(
                f"{root} is not a {reader.format_name} root: {folder}/{missing[0]} is missing; "
                f"point datasets.{name}.root at the folder containing {reader.base_folder}/ "
                "or run `kcd demo-data`"
            )
    return reader(
        str(root),
        train=split == "train",
        transform=cifar_transform(train_transform, reader.mean, reader.std),
        download=download,
    )


def cifar10_dataset(
    root: Path, split: str, train_transform: bool, image_size: int | None, download: bool
) -> LocalCIFAR10:
    """CIFAR-10 train or test split (``val`` means ``test``); ``image_size`` does not apply."""
    return _cifar("cifar10", root, split, train_transform, download)  # type: ignore[return-value]


def cifar100_dataset(
    root: Path, split: str, train_transform: bool, image_size: int | None, download: bool
) -> LocalCIFAR100:
    """CIFAR-100 train or test split (``val`` means ``test``); ``image_size`` does not apply."""
    return _cifar("cifar100", root, split, train_transform, download)  # type: ignore[return-value]


# --------------------------------------------------------------------------- imagenet


def imagenet_geometry(train: bool, image_size: int = IMAGENET_IMAGE_SIZE) -> list:
    """The geometric part of the ImageNet transform: random-resized crop and flip for training,
    resize to 256/224 of the size and centre crop for evaluation."""
    if train:
        return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    return [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]


def imagenet_transform(train: bool, image_size: int = IMAGENET_IMAGE_SIZE) -> T.Compose:
    """The standard ImageNet transform at ``image_size``: :func:`imagenet_geometry`, then
    normalise."""
    return T.Compose([*imagenet_geometry(train, image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@dataclass(frozen=True)
class FolderPipeline:
    """How an image-folder dataset's images become tensors: its ``geometry(train, image_size)``
    (transforms up to the crop), its normalisation, its default image size. The fast loader's
    decoded splits (:mod:`kcd.data.decoded`) use it apart from the dataset's own transform."""

    geometry: Callable[[bool, int], list]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int


FOLDER_PIPELINES = {"imagenet": FolderPipeline(imagenet_geometry, IMAGENET_MEAN, IMAGENET_STD,
                                               IMAGENET_IMAGE_SIZE)}
"""One per registered dataset stored as image files (``DatasetSpec.image_files``)."""
_unpiped = [n for n, spec in DATASETS.items() if spec.image_files and n not in FOLDER_PIPELINES]
if _unpiped:
    raise KcdError(f"image-folder datasets {_unpiped} have no entry in "
                   "kcd/data/datasets.py's FOLDER_PIPELINES; add their geometry and normalisation")


def folder_pipeline(name: str) -> FolderPipeline:
    """The :class:`FolderPipeline` of image-folder dataset ``name``."""
    if name not in FOLDER_PIPELINES:
        raise KcdError(f"dataset '{name}' is not stored as image files; only image-folder "
                       "datasets are decoded")
    return FOLDER_PIPELINES[name]


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir()) if folder.is_dir() else []


def imagenet_dataset(
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
            box = ann.get("bbox", ())
            if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) \
                    or box[2] < 0 or box[3] < 0:
                raise KcdError(
                    f"{ann_file}: annotation {ann.get('id')} needs a bbox [x, y, width, height] "
                    f"of numbers with width, height >= 0, got {box!r}; fix or drop it"
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
    0 stays free for the background) and ``image_id``. Crowd regions and boxes of zero width or
    height are left out, as is usual for training.
    """
    # as torchvision's COCO reference: no crowd regions, no boxes without area
    kept = [a for a in annotations if not a.get("iscrowd", 0)
            and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {
        "boxes": boxes,
        "labels": torch.tensor([a["category_id"] for a in kept], dtype=torch.int64),
        "image_id": torch.tensor(image_id, dtype=torch.int64),
    }


def coco_dataset(
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
