"""Decoded splits: an image-folder split decoded once into one uint8 tensor file.

A dataset stored as image files (``ImageFolder``: the ImageNet format) costs a decode and a
resize per image per read, in every job that reads it. With ``fast_loader`` on and no
training augmentation, the workflow decodes each split once (rule ``decode``, ``kcd decode``):
the evaluation geometry (resize and centre crop at ``image_size``) applied to every image, in
dataset order, stored as ``N x 3 x H x W`` uint8 with the labels. Jobs then read batches from
memory (:class:`~kcd.data.loader.TensorDataLoader`), normalised exactly as the standard
transform's ``ToTensor`` + ``Normalize`` would.

The file carries a fingerprint of what produced it (:func:`fingerprint`: the dataset, root,
split, image size and a hash of the file listing with sizes and modification times); a job
refuses a file whose fingerprint differs from its own data, naming it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from kcd.checkpoint import atomic_save, load_file
from kcd.errors import KcdError
from kcd.specs import DataSpec

FORMAT = "kcd-decoded-split"
VERSION = 1


def _dataset(data: DataSpec, split: str):
    """The split as an ``ImageFolder`` whose items are uint8 tensors after the evaluation
    geometry."""
    import torchvision.transforms as T

    from kcd.data.datasets import build_dataset, folder_pipeline

    pipeline = folder_pipeline(data.name)
    dataset = build_dataset(data.name, data.root, split, train_transform=False,
                            image_size=data.image_size)
    if not hasattr(dataset, "samples"):
        raise KcdError(f"dataset '{data.name}' is not stored as image files; only image-folder "
                       "datasets are decoded")
    dataset.transform = T.Compose([*pipeline.geometry(False, data.image_size or
                                                      pipeline.image_size), T.PILToTensor()])
    return dataset


def fingerprint(data: DataSpec, split: str, dataset=None) -> dict:
    """What a decoded file must have been made from to stand for ``split`` of ``data``."""
    dataset = dataset if dataset is not None else _dataset(data, split)
    digest = hashlib.sha256()
    for path, label in dataset.samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, data.root)}\0{label}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return {"format": FORMAT, "version": VERSION, "dataset": data.name, "root": str(data.root),
            "split": split, "image_size": data.image_size, "files": digest.hexdigest()}


def decode(data: DataSpec, split: str, out: str | os.PathLike, progress: bool = True) -> Path:
    """Decode ``split`` of ``data`` into ``out``; return its path."""
    dataset = _dataset(data, split)
    if len(dataset) == 0:
        raise KcdError(f"the {split} split of {data.name} in {data.root} is empty")
    images, labels = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=256, num_workers=data.workers),
                     desc=f"decode {data.name} {split}", disable=not progress):
        images.append(x)
        labels.append(y)
    return atomic_save({"fingerprint": fingerprint(data, split, dataset),
                        "images": torch.cat(images), "labels": torch.cat(labels)}, out)


def load(path: str | os.PathLike, data: DataSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8 ``N x 3 x H x W``) and labels of a decoded split, checked against
    ``data``."""
    obj = load_file(path, "decoded split")
    found = obj.get("fingerprint") if isinstance(obj, dict) else None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise KcdError(f"{path} is not a kcd decoded split; delete it and rerun the workflow "
                       "(rule decode writes it)")
    expected = fingerprint(data, split)
    changed = [k for k in expected if found.get(k) != expected[k]]
    if changed:
        what = "image files" if changed[0] == "files" else changed[0]
        raise KcdError(f"decoded split {path} was made from other {what} than {data.root} "
                       f"has now; delete it and rerun the workflow to decode it again")
    return obj["images"], obj["labels"]


def decoded_path(data: DataSpec, split: str) -> str | None:
    """The decoded file of ``split`` when ``data`` names a folder of them (``data.decoded``)."""
    return str(Path(data.decoded) / f"{split}.pt") if data.decoded else None
