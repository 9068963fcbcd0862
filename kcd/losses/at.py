"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

The attention map of a feature ``x`` (b x c x h x w) is ``at(x) = normalize(mean_c(x^p))``,
flattened over the spatial positions and L2-normalised per sample, with p = 2. The loss is
``weight * sum over pairs of mean((at(F^S) - at(F^T))^2)``, the mean taken over batch and
positions, as in the public reimplementations (the authors' code writes beta/2 with
beta = 1e3; Section 4.1 states the weight as 1e3, used here as the whole multiplier).
Channel counts of a pair may differ (the map averages over channels), spatial sizes may not.
With a transform the teacher map is taken from ``T(F^T)``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kcd.losses.base import DistillationLoss, DistillBatch, require_positive


class ATLoss(DistillationLoss):
    """Attention-map transfer; one term, ``at``."""

    method = "at"

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
        *,
        p: float = 2.0,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        require_positive(self.method, "p", p)
        self.p = float(p)

    def attention(self, x: Tensor) -> Tensor:
        """``normalize(mean over channels of x^p)``, one row of h*w values per sample."""
        return F.normalize(x.pow(self.p).mean(1).flatten(1))

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        loss = sum(
            (self.attention(s) - self.attention(t)).pow(2).mean()
            for s, t in self.feature_pairs(batch)
        )
        return {"at": self.weight * loss}
