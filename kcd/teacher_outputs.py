"""A teacher's outputs on a split, computed once and read by every run of its pairs.

Every distillation run of a (teacher, student) pair asks the same teacher the same questions:
its logits and its feature map at the distilled layer, on the evaluation split at the end (the
``teacher_kl`` and ``feature_l2`` columns) and, when the training images are not augmented, on
every training batch. :func:`compute` answers them once per (teacher weights, dataset, split),
at every layer the pair's runs distil, in one pass, and writes one file (a DAG output,
``results/<ds>/teachers/<teacher>-s<seed>/<split>.pt``); runs read it (:func:`load`) instead of
running the teacher.

- Images go through the split's evaluation transform in dataset order (:func:`~kcd.data.streams.
  eval_batches`), the same images a training stream without augmentation and the evaluation
  batches yield, so a cached answer is the teacher's answer to that very image (equal up to
  floating-point summation order, since batches differ: tests compare runs with and without
  the cache).
- Each file carries a fingerprint of what produced it (:func:`fingerprint`: the teacher's
  architecture and a hash of its weights, the dataset, root, split, image size and evaluation
  limit, the format) and the layers it holds. A run checks it against its own and refuses a
  stale file, or one without its layer, with an error naming it; the workflow rebuilds it when
  the teacher's weights change.
- Logits are always there; feature maps are stored at the ``layers`` asked for (none for a
  pair whose runs distil logits only).
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from kcd.checkpoint import atomic_save, load_file
from kcd.data import EVAL_SPLIT
from kcd.errors import KcdError
from kcd.specs import DataSpec

FORMAT = "kcd-teacher-outputs"
VERSION = 1


def weights_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a weights file's bytes (the fingerprint's link to the teacher); read once per
    process while the file's size and modification time stay the same."""
    stat = os.stat(path)
    return _hash_file(os.fspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(teacher: str, weights: str | os.PathLike, data: DataSpec, split: str) -> dict:
    """What a cached file must have been computed from to answer for this run."""
    try:
        digest = weights_hash(weights)
    except OSError as e:
        raise KcdError(f"cannot read the teacher weights {weights}: {e.strerror or e}") from None
    return {
        "format": FORMAT, "version": VERSION, "teacher": teacher, "weights_sha256": digest,
        "dataset": data.name, "root": str(data.root), "split": split,
        "image_size": data.image_size,
        "eval_limit": data.eval_limit if split == EVAL_SPLIT else None,
    }


@dataclass
class TeacherOutputs:
    """A teacher's logits (``N x K``) and feature maps per layer (``N x C x H x W``) on the
    images of one split, in dataset order."""

    logits: Tensor
    features: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, index: Tensor, layers: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """The logits and the features at ``layers`` of the images ``index``."""
        index = index.to(self.logits.device)
        return self.logits[index], [self.features[layer][index] for layer in layers]

    def to(self, device: torch.device | str) -> "TeacherOutputs":
        return TeacherOutputs(self.logits.to(device),
                              {k: v.to(device) for k, v in self.features.items()})


@torch.no_grad()
def compute(teacher: str, weights: str, num_classes: int, data: DataSpec, split: str,
            layers: Sequence[str], out: str | os.PathLike, batch_size: int = 256,
            channels_last: bool = True, progress: bool = True) -> Path:
    """Run ``teacher`` once over ``split`` and write its logits and its features at ``layers``
    to ``out``."""
    from kcd.data.streams import eval_batches
    from kcd.features import FeatureTap
    from kcd.checkpoint import load_model

    model = load_model(teacher, weights, num_classes, "teacher weights").eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    layers = sorted(set(layers))
    logits: list[Tensor] = []
    features: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    with FeatureTap(model, layers) as tap:
        for x, _ in tqdm(eval_batches(data, batch_size, split=split),
                         desc=f"{teacher} on {split}", disable=not progress):
            logits.append(model(x.contiguous(memory_format=memory_format)).float())
            for layer in layers:
                features[layer].append(tap.features[layer].float().contiguous())
    if not logits:
        raise KcdError(f"the {split} split of {data.name} in {data.root} is empty")
    return atomic_save({"fingerprint": fingerprint(teacher, weights, data, split),
                        "layers": layers, "logits": torch.cat(logits),
                        "features": {k: torch.cat(v) for k, v in features.items()}}, out)


def load(path: str, teacher: str, weights: str, data: DataSpec, split: str,
         layers: Sequence[str]) -> TeacherOutputs:
    """The cached outputs in ``path``, checked against the run's own fingerprint and
    ``layers`` (the teacher layers it reads)."""
    # mapped, not read: a run reads the rows of the images it draws (about half an epoch at
    # demo scale) of the layers it distils, not the whole file (330 MB for CIFAR's train split)
    obj = load_file(path, "teacher outputs", mmap=True)
    found = obj.get("fingerprint") if isinstance(obj, dict) else None
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise KcdError(f"{path} is not a kcd teacher-outputs file; delete it and rerun the "
                       "workflow (rule teacher_outputs writes it)")
    expected = fingerprint(teacher, weights, data, split)
    changed = [k for k in expected if found.get(k) != expected[k]]
    if changed:
        raise KcdError(f"teacher outputs {path} were computed from another {changed[0]} "
                       f"({found.get(changed[0])!r}, this run has {expected[changed[0]]!r}); "
                       "delete it and rerun the workflow to rebuild it")
    missing = [layer for layer in layers if layer not in obj["features"]]
    if missing:
        raise KcdError(f"teacher outputs {path} hold no features of layer '{missing[0]}' (only "
                       f"{', '.join(obj['features']) or 'logits'}); delete it and rerun the "
                       "workflow to rebuild it")
    return TeacherOutputs(obj["logits"], {k: obj["features"][k] for k in layers})
