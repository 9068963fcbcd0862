"""Batch streams for the engines: infinite, resumable training streams and evaluation batches.

The training loop is iteration-based, so it asks for an endless stream of ``(images, labels)``
batches that it can checkpoint and resume exactly:

- the fast path (:class:`~kcd.data.loader.TensorDataLoader`) for splits that fit in memory
  (CIFAR-size images), with batched augmentation on tensors;
- the standard path (:class:`SampleStream`) for everything else: torchvision datasets with
  per-image PIL transforms through a ``DataLoader``.

Both offer ``iterate_forever()``, ``state_dict()`` and ``load_state_dict()``. Both shuffle with a permutation drawn from ``(seed, epoch)`` and shard it across distributed
ranks like ``DistributedSampler``. In the standard path each image's augmentation is seeded by
``(seed, epoch, index)``, so the batches do not depend on the number of workers or on where a
run was resumed: a resumed stream yields exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from kcd.data import EVAL_SPLIT, TRAIN_SPLIT, decoded
from kcd.data.datasets import CIFAR_READERS, build_dataset, folder_pipeline
from kcd.data.loader import TensorDataLoader
from kcd.errors import KcdError
from kcd.specs import DataSpec



def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across processes."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (v + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


class _SeededItems(Dataset):
    """Items addressed as (index, seed): the transform runs under its own RNG seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return (*self.dataset[index], index)


class SampleStream:
    """An endless, resumable stream of batches from a map-style dataset (standard path)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, loader_options: dict | None = None) -> None:
        self.items = _SeededItems(dataset)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.loader_options = loader_options or {}  # DataLoader's workers, pinning, prefetch
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded
        n = len(dataset)  # type: ignore[arg-type]
        self.batches_per_epoch = (n // world_size) // batch_size
        if self.batches_per_epoch < 1:
            raise KcdError(f"{n} training images are fewer than one batch of {batch_size} per "
                           "rank; lower recipe.batch_size")

    def _epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm = torch.randperm(len(self.items), generator=g).tolist()
        shard = perm[self.rank::self.world_size]
        out = []
        for b in range(self.batches_per_epoch):
            idx = shard[b * self.batch_size:(b + 1) * self.batch_size]
            out.append([(i, mix_seed(self.seed, epoch, i)) for i in idx])
        return out

    def iterate_forever(self, indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Endless ``(images, labels)`` batches, epoch after epoch, from where the stream
        stands; ``indices``: ``(images, labels, dataset indices)``."""
        while True:
            batches = self._epoch_batches(self.epoch)[self.position:]
            loader = DataLoader(self.items, batch_sampler=batches, persistent_workers=False,
                                **self.loader_options)
            for x, y, index in loader:
                self.position += 1
                yield (x, y, index) if indices else (x, y)
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("batch_size", self.batch_size), state.get("world_size", self.world_size))
        if saved != (self.batch_size, self.world_size):
            raise KcdError(f"cannot resume the batch stream: saved with batch_size, world_size = "
                           f"{saved}, now {(self.batch_size, self.world_size)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def train_stream(data: DataSpec, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
    """The training stream of ``data``: the fast path when possible, else :class:`SampleStream`.

    With ``data.augment`` false, the images are those of the evaluation transform (so they
    equal :func:`eval_batches` of the ``train`` split, image by image)."""
    if data.fast_loader and data.name in CIFAR_READERS:
        dataset = build_dataset(data.name, data.root, "train", train_transform=False,
                                download=data.download)
        return TensorDataLoader.from_cifar(dataset, batch_size=batch_size, shuffle=True,
                                           augment=data.augment, seed=seed, rank=rank,
                                           world_size=world_size, drop_last=True,
                                           channels_last=channels_last)
    if data.decoded and not data.augment:  # an image-folder split decoded once
        images, labels = decoded.load(decoded.decoded_path(data, TRAIN_SPLIT), data, TRAIN_SPLIT)
        pipeline = folder_pipeline(data.name)
        return TensorDataLoader(images, labels, batch_size=batch_size, shuffle=True,
                                augment=False, seed=seed, rank=rank, world_size=world_size,
                                drop_last=True, channels_last=channels_last,
                                mean=pipeline.mean, std=pipeline.std)
    dataset = build_dataset(data.name, data.root, "train", train_transform=data.augment,
                            image_size=data.image_size, download=data.download)
    return SampleStream(dataset, batch_size, seed=seed, rank=rank, world_size=world_size,
                        loader_options=_loader_options(data))


def _loader_options(data: DataSpec) -> dict:
    """A DataLoader's workers, page-locked batches (on CUDA only) and prefetch (with workers)."""
    return {"num_workers": data.workers,
            "pin_memory": data.pin_memory and torch.cuda.is_available(),
            "prefetch_factor": data.prefetch_factor if data.workers > 0 else None}


def eval_batches(data: DataSpec, batch_size: int, split: str = EVAL_SPLIT,
                 limit: int | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``split`` with evaluation transforms, in order (no augmentation).

    ``limit``: at most that many images, every k-th one, so that a split stored in class order
    (ImageFolder) still covers every class.
    """
    if data.decoded:  # an image-folder split decoded once: the same images, from memory
        images, labels = decoded.load(decoded.decoded_path(data, split), data, split)
        if data.eval_limit is not None and split == EVAL_SPLIT:
            images, labels = images[:data.eval_limit], labels[:data.eval_limit]
        if limit is not None and limit < len(images):
            stride = -(-len(images) // limit)
            images, labels = images[::stride], labels[::stride]
        pipeline = folder_pipeline(data.name)
        return TensorDataLoader(images, labels, batch_size=batch_size, shuffle=False,
                                augment=False, drop_last=False, mean=pipeline.mean,
                                std=pipeline.std)
    dataset = build_dataset(data.name, data.root, split, train_transform=False,
                            image_size=data.image_size)
    if data.eval_limit is not None and split == EVAL_SPLIT:
        dataset = Subset(dataset, range(min(data.eval_limit, len(dataset))))
    if limit is not None and limit < len(dataset):
        stride = -(-len(dataset) // limit)
        dataset = Subset(dataset, range(0, len(dataset), stride))
    if data.fast_loader and data.name in CIFAR_READERS and not isinstance(dataset, Subset):
        return TensorDataLoader.from_cifar(dataset, batch_size=batch_size, shuffle=False,
                                           augment=False, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_options(data))
