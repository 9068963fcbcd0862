"""Synthetic, learnable demo data written in the real on-disk formats.

:func:`write_demo_data` writes three small datasets under one root so that the pipeline runs end to
end without downloading anything (a fourth, ``cifar10``, is written only when asked for):

``cifar100``
    ``root/cifar-100-python/{train,test,meta}``: pickles in the exact CIFAR-100 python layout (dicts
    keyed by Python 2 strings, as in the original files), read by torchvision's ``CIFAR100`` through
    :class:`kcd.data.datasets.LocalCIFAR100`. 100 fine classes in 20 superclasses, 32x32 RGB.
``imagenet``
    ``root/imagenet/{train,val}/<wnid>/<wnid>_<index>.png``: an ``ImageFolder`` tree of small RGB
    images (default 10 classes at 64x64).
``coco``
    ``root/coco/{train2017,val2017}/<12-digit id>.jpg`` and
    ``root/coco/annotations/instances_{train2017,val2017}.json``: simple filled shapes on a noisy
    background with tight boxes, in the COCO detection format.
``cifar10`` (not written by default)
    ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``: pickles in the exact
    CIFAR-10 python layout (Python 2 strings, ``labels``, ``label_names``), read by torchvision's
    ``CIFAR10`` through :class:`kcd.data.datasets.LocalCIFAR10`. 10 classes in 5 pairs, 32x32 RGB;
    the training images are split over the five batches.

Classification images follow one recipe: each superclass owns a smooth random colour pattern, each
class adds its own smooth deviation, and every sample is a random crop of its class pattern
(shifted within a margin of the image side), possibly mirrored, with a per-sample smooth nuisance
pattern, contrast/brightness jitter and pixel noise. How far apart the classes are is set per
format (:class:`ImageRecipe`) for the demo's short recipes, which see each CIFAR-format image
about half a time (a nearest-class-mean on 8x8-pooled CIFAR-format pixels reaches about 90%,
chance 1%). What the demo's models reach on this data is measured, with its commit, in the
README (the demo's numbers); at these budgets it moves with any change of float rounding.

Everything is a pure function of the seed and :class:`DemoSizes`: the same seed writes
byte-identical files (given the same numpy/Pillow builds). Each dataset is written into a
temporary folder beside its target and renamed into place when complete, with a manifest
(``.kcd-demo.json``) recording seed and sizes; a later call with the same seed and sizes skips it,
different ones rewrite it. A target folder without that manifest is never overwritten.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from kcd.data import demo_folders
from kcd.errors import KcdError

KINDS = ("cifar100", "imagenet", "coco")  # written by default
ALL_KINDS = (*KINDS, "cifar10")  # also written on request
MANIFEST = ".kcd-demo.json"
FORMAT_VERSION = 2  # 2: easier classes, per format (CIFAR_IMAGES, IMAGENET_IMAGES)

FOLDERS = demo_folders()
"""Each demo dataset's folder under the demo root (its manifest is ``<folder>/.kcd-demo.json``),
from the dataset registry (``DatasetSpec.demo_folder``)."""
if set(FOLDERS) != set(ALL_KINDS):
    raise KcdError(f"kcd/data/demo.py writes {sorted(ALL_KINDS)} but the dataset registry gives "
                   f"demo folders to {sorted(FOLDERS)}; keep the two the same")
CIFAR_DIR = FOLDERS["cifar100"]
CIFAR10_DIR = FOLDERS["cifar10"]
CIFAR10_CLASSES = 10
CIFAR10_TRAIN_BATCHES = 5
CIFAR_FINE_CLASSES = 100
CIFAR_COARSE_CLASSES = 20
CIFAR_SIZE = 32

# Recipe of the classification images (units: standard deviations of a unit pattern).
MAX_FREQUENCY = 3  # highest spatial frequency of a pattern, in cycles per canvas


@dataclass(frozen=True)
class ImageRecipe:
    """How hard one format's classes are to tell apart (units: standard deviations of a unit
    pattern). The demo's short runs see each CIFAR-format image about half a time, so those
    classes are the easier; the ten ImageNet-format classes are seen a few times each."""

    canvas_margin: float  # class patterns are this fraction of the image side larger: crop range
    class_deviation: float  # size of a class's own pattern next to its superclass pattern
    nuisance: float  # size of the per-sample smooth pattern
    noise: float  # per-pixel Gaussian noise


CIFAR_IMAGES = ImageRecipe(canvas_margin=0.25, class_deviation=1.5, nuisance=0.3, noise=0.2)
IMAGENET_IMAGES = ImageRecipe(canvas_margin=0.375, class_deviation=1.0, nuisance=0.4, noise=0.25)
CONTRAST = (0.6, 1.4)  # uniform range of the per-sample contrast factor
BRIGHTNESS = 0.3  # standard deviation of the per-sample, per-channel brightness shift
PIXEL_SCALE = 36.0  # grey levels per unit: pixel = 128 + PIXEL_SCALE * value

COCO_SHAPES = ("rectangle", "circle", "triangle", "diamond", "cross")
COCO_COLOURS = ((220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 30), (180, 60, 200))
COCO_MAX_OBJECTS = 4


@dataclass(frozen=True)
class DemoSizes:
    """How much demo data to write; the defaults make the demo scale of the pipeline."""

    cifar_train_per_class: int = 100
    cifar_test_per_class: int = 10
    imagenet_classes: int = 10
    imagenet_train_per_class: int = 100
    imagenet_val_per_class: int = 20
    imagenet_image_size: int = 64
    coco_categories: int = 4
    coco_train_images: int = 200
    coco_val_images: int = 50
    coco_image_size: int = 64  # the demo detectors (kcd.detection) run at this size
    cifar10_train_per_class: int = 100
    cifar10_test_per_class: int = 20

    @classmethod
    def tiny(cls) -> "DemoSizes":
        """Sizes for tests: a few images per class, written in about a second."""
        return cls(
            cifar_train_per_class=10,
            cifar_test_per_class=4,
            imagenet_classes=3,
            imagenet_train_per_class=4,
            imagenet_val_per_class=2,
            imagenet_image_size=32,
            coco_categories=3,
            coco_train_images=8,
            coco_val_images=4,
            coco_image_size=64,
            cifar10_train_per_class=5,
            cifar10_test_per_class=3,
        )

    def validate(self) -> None:
        """Raise :class:`KcdError` for a size that cannot be generated."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise KcdError(f"demo size {field.name}={value!r} must be a positive integer")
        if self.coco_categories > len(COCO_SHAPES):
            raise KcdError(
                f"demo size coco_categories={self.coco_categories} is too large; "
                f"at most {len(COCO_SHAPES)} shapes are drawn ({', '.join(COCO_SHAPES)})"
            )
        if self.imagenet_image_size < 8 or self.coco_image_size < 32:
            raise KcdError(
                "demo image sizes are too small; use imagenet_image_size >= 8 and coco_image_size >= 32"
            )

    def for_kind(self, kind: str) -> dict[str, int]:
        """The sizes that shape one dataset (recorded in its manifest)."""
        prefix = "cifar_" if kind == "cifar100" else f"{kind}_"  # cifar10: "cifar10_"
        return {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefix)}


def write_demo_data(
    root: str | os.PathLike,
    seed: int = 0,
    kinds: Iterable[str] = KINDS,
    sizes: DemoSizes = DemoSizes(),
    progress: bool = True,
) -> dict[str, Path]:
    """Write the demo datasets ``kinds`` under ``root``; return each one's dataset root.

    The returned paths are what :func:`kcd.data.datasets.build_dataset` takes as ``root``:
    ``root`` itself for ``cifar100`` and ``cifar10`` (torchvision looks for ``cifar-100-python/``
    and ``cifar-10-batches-py/`` inside it), ``root/imagenet`` and ``root/coco`` for the others.
    ``kinds`` defaults to :data:`KINDS`; ``cifar10`` is also known (:data:`ALL_KINDS`). A dataset
    already written with the same seed and sizes is left as it is.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise KcdError(f"unknown demo dataset {', '.join(unknown)}; known: {', '.join(ALL_KINDS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise KcdError(f"demo seed {seed!r} must be a non-negative integer")
    sizes.validate()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Callable[[Path, int, DemoSizes, bool], None]] = {
        "cifar100": _write_cifar100,
        "imagenet": _write_imagenet,
        "coco": _write_coco,
        "cifar10": _write_cifar10,
    }
    written: dict[str, Path] = {}
    for kind in kinds:
        folder, writer = FOLDERS[kind], writers[kind]
        manifest = {"kind": kind, "seed": seed, "sizes": sizes.for_kind(kind), "version": FORMAT_VERSION}
        _write_atomically(root / folder, manifest, lambda out: writer(out, seed, sizes, progress))
        written[kind] = root if kind in ("cifar100", "cifar10") else root / folder
    return written


# --------------------------------------------------------------------------- atomic folders


def _write_atomically(target: Path, manifest: dict, fill: Callable[[Path], None]) -> None:
    """Fill a fresh folder beside ``target`` and rename it into place, unless already done."""
    found = _read_manifest(target)
    if found is not None and {k: found.get(k) for k in manifest} == manifest:
        if _count_files(target) == found.get("files"):
            return
    elif target.exists() and found is None and any(target.iterdir()):
        raise KcdError(
            f"{target} exists and was not written by `kcd demo-data`; "
            "choose another demo root or move that folder away"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(tmp)
        (tmp / MANIFEST).write_text(
            json.dumps({**manifest, "files": _count_files(tmp) + 1}, indent=1, sort_keys=True) + "\n"
        )
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _rng(seed: int, kind: str, part: str) -> np.random.Generator:
    """An independent random stream per (seed, dataset, part), stable across runs and platforms."""
    return np.random.default_rng([seed, zlib.crc32(kind.encode()), zlib.crc32(part.encode())])


# --------------------------------------------------------------------------- class-structured images


def _fourier_basis(size: int) -> np.ndarray:
    """Smooth basis functions on a ``size`` x ``size`` grid, shape ``(2F, size * size)``.

    Cosines and sines of all frequencies up to :data:`MAX_FREQUENCY` cycles per side (one of each
    +-k pair), weighted 1/(1+|k|) so that coarse structure dominates.
    """
    k = np.arange(-MAX_FREQUENCY, MAX_FREQUENCY + 1)
    ky, kx = (a.ravel() for a in np.meshgrid(k, k, indexing="ij"))
    keep = (ky > 0) | ((ky == 0) & (kx > 0))
    ky, kx = ky[keep], kx[keep]
    y, x = (a.ravel() for a in np.meshgrid(np.arange(size), np.arange(size), indexing="ij"))
    theta = 2 * np.pi * (np.outer(ky, y) + np.outer(kx, x)) / size
    weight = (1.0 / (1.0 + np.hypot(ky, kx)))[:, None]
    return np.concatenate([weight * np.cos(theta), weight * np.sin(theta)])


def _smooth_patterns(rng: np.random.Generator, n: int, basis: np.ndarray) -> np.ndarray:
    """``n`` random smooth RGB patterns with zero mean and unit variance, shape ``(n, 3, s, s)``."""
    size = int(round(np.sqrt(basis.shape[1])))
    coefficients = rng.standard_normal((n * 3, basis.shape[0]))
    patterns = (coefficients @ basis).reshape(n, 3 * size * size)
    patterns -= patterns.mean(axis=1, keepdims=True)
    patterns /= patterns.std(axis=1, keepdims=True)
    return patterns.reshape(n, 3, size, size)


def _class_patterns(rng: np.random.Generator, superclass_of: np.ndarray, size: int,
                    recipe: ImageRecipe) -> np.ndarray:
    """One pattern per class on a canvas larger than ``size`` (the crop range): its
    superclass's pattern plus a class-specific one."""
    basis = _fourier_basis(size + round(recipe.canvas_margin * size))
    shared = _smooth_patterns(rng, int(superclass_of.max()) + 1, basis)
    own = _smooth_patterns(rng, len(superclass_of), basis)
    return shared[superclass_of] + recipe.class_deviation * own


def _render(
    rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray, size: int,
    recipe: ImageRecipe, chunk: int = 1000,
) -> Iterable[np.ndarray]:
    """Yield uint8 images ``(n, size, size, 3)`` of the given labels, ``chunk`` at a time.

    Each image is a random ``size`` crop of its class pattern (on a larger canvas), mirrored
    with probability 1/2, plus a smooth nuisance pattern, contrast/brightness jitter and noise.
    """
    canvas = patterns.shape[-1]
    basis = _fourier_basis(size)
    rows = np.arange(size)
    for start in range(0, len(labels), chunk):
        y = labels[start : start + chunk]
        n = len(y)
        dy, dx = rng.integers(0, canvas - size + 1, size=(2, n))
        flip = rng.random(n) < 0.5
        cols = np.where(flip[:, None], size - 1 - rows, rows) + dx[:, None]  # (n, size)
        crop = patterns[
            y[:, None, None, None],
            np.arange(3)[None, :, None, None],
            (dy[:, None] + rows)[:, None, :, None],
            cols[:, None, None, :],
        ]
        contrast = rng.uniform(*CONTRAST, size=(n, 1, 1, 1))
        brightness = BRIGHTNESS * rng.standard_normal((n, 3, 1, 1))
        image = contrast * (crop + recipe.nuisance * _smooth_patterns(rng, n, basis)) + brightness
        image += recipe.noise * rng.standard_normal(image.shape)
        pixels = np.clip(np.rint(128.0 + PIXEL_SCALE * image), 0, 255).astype(np.uint8)
        yield pixels.transpose(0, 2, 3, 1)


def _balanced_labels(rng: np.random.Generator, classes: int, per_class: int) -> np.ndarray:
    """``per_class`` of each class, in a random order."""
    return rng.permutation(np.repeat(np.arange(classes), per_class))


# --------------------------------------------------------------------------- cifar100


class _Python2Pickler(pickle._Pickler):
    """A pickler that writes ``bytes`` as Python 2 ``str`` opcodes, like the original CIFAR files.

    Loaded with ``encoding="latin1"`` (as torchvision does) these become ``str``; loaded with
    ``encoding="bytes"`` (as the CIFAR web page shows) they stay ``bytes``: exactly the behaviour of
    the real files, whose keys and names are Python 2 strings.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _dump_python2(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def _write_cifar100(out: Path, seed: int, sizes: DemoSizes, progress: bool) -> None:
    """Write ``train``, ``test`` and ``meta`` in the CIFAR-100 python layout into ``out``."""
    rng = _rng(seed, "cifar100", "classes")
    superclass_of = rng.permutation(np.repeat(np.arange(CIFAR_COARSE_CLASSES), 5))
    patterns = _class_patterns(rng, superclass_of, CIFAR_SIZE, CIFAR_IMAGES)
    fine_names = [f"class_{i:02d}" for i in range(CIFAR_FINE_CLASSES)]
    coarse_names = [f"superclass_{i:02d}" for i in range(CIFAR_COARSE_CLASSES)]
    splits = (
        ("train", sizes.cifar_train_per_class, "training"),
        ("test", sizes.cifar_test_per_class, "testing"),
    )
    total = CIFAR_FINE_CLASSES * (sizes.cifar_train_per_class + sizes.cifar_test_per_class)
    with tqdm(total=total, desc="demo cifar100", unit="img", disable=not progress) as bar:
        for split, per_class, batch_name in splits:
            split_rng = _rng(seed, "cifar100", split)
            labels = _balanced_labels(split_rng, CIFAR_FINE_CLASSES, per_class)
            chunks = []
            for images in _render(split_rng, patterns, labels, CIFAR_SIZE, CIFAR_IMAGES):
                chunks.append(images.transpose(0, 3, 1, 2).reshape(len(images), -1))  # R, G, B planes
                bar.update(len(images))
            filenames = [f"{fine_names[y]}_s_{i:06d}.png".encode() for i, y in enumerate(labels)]
            _dump_python2(
                {
                    b"filenames": filenames,
                    b"batch_label": f"{batch_name} batch 1 of 1".encode(),
                    b"fine_labels": labels.tolist(),
                    b"coarse_labels": superclass_of[labels].tolist(),
                    b"data": np.concatenate(chunks),
                },
                out / split,
            )
    _dump_python2(
        {
            b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names],
        },
        out / "meta",
    )


# --------------------------------------------------------------------------- cifar10


def _write_cifar10(out: Path, seed: int, sizes: DemoSizes, progress: bool) -> None:
    """Write ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` in the CIFAR-10 python
    layout into ``out``; the shuffled training images are split evenly over the five batches."""
    rng = _rng(seed, "cifar10", "classes")
    superclass_of = rng.permutation(np.repeat(np.arange(CIFAR10_CLASSES // 2), 2))
    patterns = _class_patterns(rng, superclass_of, CIFAR_SIZE, CIFAR_IMAGES)
    names = [f"class_{i}" for i in range(CIFAR10_CLASSES)]
    splits = (("train", sizes.cifar10_train_per_class), ("test", sizes.cifar10_test_per_class))
    total = CIFAR10_CLASSES * (sizes.cifar10_train_per_class + sizes.cifar10_test_per_class)
    with tqdm(total=total, desc="demo cifar10", unit="img", disable=not progress) as bar:
        for split, per_class in splits:
            split_rng = _rng(seed, "cifar10", split)
            labels = _balanced_labels(split_rng, CIFAR10_CLASSES, per_class)
            chunks = []
            for images in _render(split_rng, patterns, labels, CIFAR_SIZE, CIFAR_IMAGES):
                chunks.append(images.transpose(0, 3, 1, 2).reshape(len(images), -1))  # R, G, B planes
                bar.update(len(images))
            data = np.concatenate(chunks)
            files = [f"{names[y]}_s_{i:06d}.png".encode() for i, y in enumerate(labels)]
            if split == "train":
                parts = np.array_split(np.arange(len(labels)), CIFAR10_TRAIN_BATCHES)
                batches = [(f"data_batch_{b + 1}", f"training batch {b + 1} of 5", part)
                           for b, part in enumerate(parts)]
            else:
                batches = [("test_batch", "testing batch 1 of 1", np.arange(len(labels)))]
            for filename, batch_label, index in batches:
                _dump_python2(
                    {
                        b"batch_label": batch_label.encode(),
                        b"labels": labels[index].tolist(),
                        b"data": data[index],
                        b"filenames": [files[i] for i in index],
                    },
                    out / filename,
                )
    _dump_python2(
        {
            b"num_cases_per_batch": -(-CIFAR10_CLASSES * sizes.cifar10_train_per_class
                                      // CIFAR10_TRAIN_BATCHES),
            b"label_names": [n.encode() for n in names],
            b"num_vis": 3 * CIFAR_SIZE * CIFAR_SIZE,
        },
        out / "batches.meta",
    )


# --------------------------------------------------------------------------- imagenet


def _write_imagenet(out: Path, seed: int, sizes: DemoSizes, progress: bool) -> None:
    """Write an ``ImageFolder`` tree ``out/{train,val}/<wnid>/<wnid>_<index>.png``."""
    rng = _rng(seed, "imagenet", "classes")
    classes, size = sizes.imagenet_classes, sizes.imagenet_image_size
    superclass_of = rng.permutation(np.arange(classes) % max(1, classes // 5))
    patterns = _class_patterns(rng, superclass_of, size, IMAGENET_IMAGES)
    wnids = [f"n{i:08d}" for i in range(classes)]
    splits = (("train", sizes.imagenet_train_per_class), ("val", sizes.imagenet_val_per_class))
    total = classes * (sizes.imagenet_train_per_class + sizes.imagenet_val_per_class)
    with tqdm(total=total, desc="demo imagenet", unit="img", disable=not progress) as bar:
        for split, per_class in splits:
            for wnid in wnids:
                (out / split / wnid).mkdir(parents=True)
            split_rng = _rng(seed, "imagenet", split)
            labels = _balanced_labels(split_rng, classes, per_class)
            index = 0
            for images in _render(split_rng, patterns, labels, size, IMAGENET_IMAGES, chunk=200):
                for image in images:
                    wnid = wnids[labels[index]]
                    Image.fromarray(image).save(out / split / wnid / f"{wnid}_{index:05d}.png")
                    index += 1
                bar.update(len(images))


# --------------------------------------------------------------------------- coco


def _shape_mask(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A boolean ``size`` x ``size`` mask of a filled ``shape`` inscribed in ``box`` (x0, y0, x1, y1)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    xm, ym = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "rectangle":
        draw.rectangle(box, fill=255)
    elif shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (xm, y0)], fill=255)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=255)
    else:  # cross
        tx, ty = max(1, (x1 - x0) // 6), max(1, (y1 - y0) // 6)
        draw.rectangle((xm - tx, y0, xm + tx, y1), fill=255)
        draw.rectangle((x0, ym - ty, x1, ym + ty), fill=255)
    return np.asarray(mask) > 0


def _place_boxes(rng: np.random.Generator, count: int, size: int) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` boxes (x0, y0, x1, y1 inclusive) with sides 15-40% of the image, at least one
    pixel apart, so that every drawn shape stays fully visible and its box tight."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(20 * count):
        if len(boxes) == count:
            break
        w, h = rng.integers(int(0.15 * size), int(0.4 * size) + 1, size=2)
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = (x0, y0, x0 + int(w) - 1, y0 + int(h) - 1)
        apart = (
            box[0] > b[2] + 1 or b[0] > box[2] + 1 or box[1] > b[3] + 1 or b[1] > box[3] + 1
            for b in boxes
        )
        if all(apart):
            boxes.append(box)
    return boxes


def _coco_image(
    rng: np.random.Generator, size: int, categories: int, basis: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One image (uint8 HxWx3) and its objects as (category id, [x, y, w, h] tight box)."""
    background = 110.0 + 25.0 * _smooth_patterns(rng, 1, basis)[0].transpose(1, 2, 0)
    image = background + 12.0 * rng.standard_normal((size, size, 3))
    objects = []
    for box in _place_boxes(rng, int(rng.integers(1, COCO_MAX_OBJECTS + 1)), size):
        category = int(rng.integers(categories))
        mask = _shape_mask(COCO_SHAPES[category], box, size)
        ys, xs = np.nonzero(mask)
        colour = np.asarray(COCO_COLOURS[category], dtype=float) + rng.uniform(-25, 25, size=3)
        image[mask] = colour + 10.0 * rng.standard_normal((len(ys), 3))
        x, y = int(xs.min()), int(ys.min())
        objects.append((category + 1, [x, y, int(xs.max()) - x + 1, int(ys.max()) - y + 1]))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _write_coco(out: Path, seed: int, sizes: DemoSizes, progress: bool) -> None:
    """Write ``{train2017,val2017}/*.jpg`` and ``annotations/instances_*.json`` into ``out``."""
    size, categories = sizes.coco_image_size, sizes.coco_categories
    basis = _fourier_basis(size)
    category_list = [
        {"id": i + 1, "name": COCO_SHAPES[i], "supercategory": "shape"} for i in range(categories)
    ]
    (out / "annotations").mkdir()
    image_id = annotation_id = 0
    splits = (("train2017", sizes.coco_train_images), ("val2017", sizes.coco_val_images))
    total = sizes.coco_train_images + sizes.coco_val_images
    with tqdm(total=total, desc="demo coco", unit="img", disable=not progress) as bar:
        for split, count in splits:
            (out / split).mkdir()
            rng = _rng(seed, "coco", split)
            images, annotations = [], []
            for _ in range(count):
                image_id += 1
                pixels, objects = _coco_image(rng, size, categories, basis)
                file_name = f"{image_id:012d}.jpg"
                Image.fromarray(pixels).save(out / split / file_name, quality=92)
                images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
                for category_id, (x, y, w, h) in objects:
                    annotation_id += 1
                    annotations.append(
                        {
                            "id": annotation_id,
                            "image_id": image_id,
                            "category_id": category_id,
                            "bbox": [x, y, w, h],
                            "area": w * h,
                            "iscrowd": 0,
                            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                        }
                    )
                bar.update(1)
            document = {
                "info": {"description": "kcd synthetic demo data", "version": str(FORMAT_VERSION)},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": category_list,
            }
            (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
