"""A fast, resumable loader for small-image datasets held in memory as one uint8 tensor.

:class:`TensorDataLoader` replaces ``DataLoader`` + per-image PIL transforms for CIFAR-size data:
it indexes a batch out of an ``N x 3 x H x W`` uint8 tensor and applies the standard augmentation
(``RandomCrop(H, padding=4)`` + ``RandomHorizontalFlip``, same distribution) to the whole batch at
once, then normalises exactly like ``ToTensor`` + ``Normalize``.

Randomness is a pure function of ``(seed, epoch)``: the permutation, crop offsets and flips of an
epoch are drawn up front, per position of the permutation, from a ``torch.Generator`` seeded by
both. Therefore the loader's state is just ``(epoch, batches handed out in this epoch)``, a resumed
loader yields exactly the remaining batches, every rank of a distributed run sees the same
permutation, and a sample's augmentation does not depend on the number of ranks.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kcd.data.datasets import CIFAR100_MEAN, CIFAR100_STD, CIFAR_PADDING
from kcd.errors import KcdError


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """Zero-pad ``images`` (``B x C x H x W``) by ``padding``, crop ``H x W`` at per-sample
    ``offsets`` (``B x 2``: top, left in ``0..2*padding``) and mirror where ``flips`` is true.

    Equals torchvision's ``pad`` -> ``crop(top, left)`` -> ``hflip`` per image, for any dtype.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    width = w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # B x H
    cols = torch.arange(w, device=images.device).expand(b, w)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - cols, cols)  # B x W
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


class TensorDataLoader:
    """Batches of normalised float images and long labels from in-memory uint8 images.

    Args:
        images: ``N x 3 x H x W`` uint8 tensor (kept on ``device``).
        labels: ``N`` integer labels.
        batch_size: samples per batch (per rank).
        shuffle: a fresh random order every epoch; otherwise the stored order.
        drop_last: skip the last, smaller batch of an epoch.
        augment: random crop with ``padding`` zero pixels on each side, plus horizontal flip.
        seed: seeds the per-epoch random draws.
        mean, std: per-channel normalisation (default: CIFAR-100's, as in the standard transform).
        channels_last: return batches in ``torch.channels_last`` memory format.
        rank, world_size: distributed sharding; like ``DistributedSampler``, every rank takes every
            ``world_size``-th sample of the same permutation, the permutation padded with its own
            beginning to a multiple of ``world_size`` so all ranks yield equally many batches.
        padding: crop padding in pixels (4 as in the paper's CIFAR setup).
        device: where images are stored and batches are made.

    Iterating yields the rest of the current epoch and then moves to the next epoch; use
    :meth:`iterate_forever` for iteration-based training. The loader is its own single cursor:
    do not interleave two iterators over one loader.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        *,
        batch_size: int = 128,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = True,
        seed: int = 0,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        padding: int = CIFAR_PADDING,
        device: torch.device | str = "cpu",
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise KcdError(
                f"TensorDataLoader needs uint8 images N x 3 x H x W, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if len(labels) != len(images) or len(images) == 0:
            raise KcdError(
                f"TensorDataLoader got {len(images)} images and {len(labels)} labels; "
                "it needs as many of each, at least one"
            )
        if batch_size < 1:
            raise KcdError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise KcdError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.padding, self.seed = augment, padding, seed
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.num_samples = math.ceil(len(images) / world_size)  # per rank
        if len(self) == 0:
            raise KcdError(
                f"batch_size {batch_size} with drop_last leaves no batch of the {self.num_samples} "
                "samples per rank; lower the batch size or set drop_last to false"
            )
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    @classmethod
    def from_cifar(cls, dataset: Any, **kwargs: Any) -> "TensorDataLoader":
        """Build from a torchvision ``CIFAR10``/``CIFAR100`` object (its ``.data`` HWC uint8 array
        and ``.targets``); its own transform is not used. ``kwargs`` go to the constructor.

        ``mean``/``std`` default to the dataset's own (``LocalCIFAR10``/``LocalCIFAR100`` carry
        them, so batches match its standard transform), else to CIFAR-100's."""
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        for key in ("mean", "std"):
            if isinstance(getattr(dataset, key, None), tuple):
                kwargs.setdefault(key, getattr(dataset, key))
        return cls(images, dataset.targets, **kwargs)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _epoch_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's sample indices, crop offsets and flips of ``epoch`` (all on the CPU)."""
        n = len(self.images)
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        total = self.num_samples * self.world_size
        positions = torch.arange(total) % n  # wrap around to pad, as DistributedSampler does
        mine = positions[self.rank : total : self.world_size]
        return order[mine], offsets[mine], flips[mine]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches(indices=False)

    def _batches(self, indices: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        order, offsets, flips = self._epoch_draws(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            batch = slice(start, start + self.batch_size)
            self.position += 1
            x, y = self._make_batch(order[batch], offsets[batch], flips[batch])
            yield (x, y, order[batch]) if indices else (x, y)

    def iterate_forever(self, indices: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """An endless stream of batches, epoch after epoch (for iteration-based schedules);
        ``indices``: ``(images, labels, indices into the images)``."""
        while True:
            yield from self._batches(indices)

    def _make_batch(
        self, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.to(self.device)
        images = self.images[indices]
        if self.augment:
            images = crop_flip(images, offsets.to(self.device), flips.to(self.device), self.padding)
        x = images.float().div(255).sub(self.mean).div(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[indices]

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: ``epoch`` and ``position`` (batches handed out in it), plus the
        settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_images": len(self.images),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": int(self.shuffle),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; the next batches are exactly those that would have come."""
        mine = self.state_dict()
        different = [k for k in mine if k not in ("epoch", "position") and state.get(k) != mine[k]]
        if different:
            k = different[0]
            raise KcdError(
                f"cannot resume the data loader: it was saved with {k}={state.get(k)} but now has "
                f"{k}={mine[k]}; resume with the same data and loader settings"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
