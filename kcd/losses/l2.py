"""Ours (KCD): L2 between the student feature and the transformed teacher feature, Eq. 9.

``weight * sum over pairs of MSE(F^S, T(F^T))``: no regressor, so after the transform the
teacher's channel count must equal the student's. Without a transform this is plain feature
L2 (the paper's "traditional" special case, T = identity). The paper gives no weight for
classification; the registry defaults to FitNets' 1e2, the closest loss. On COCO Section 4.1
uses 1e-4, which the detection config sets.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kcd.errors import KcdError
from kcd.losses.base import DistillationLoss, DistillBatch


class L2Loss(DistillationLoss):
    """Feature L2 to the transformed teacher; one term, ``l2``."""

    method = "l2"

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        for i, (s, t) in enumerate(zip(self.student_channels, self.target_channels)):
            if s != t:
                raise KcdError(
                    f"{self.method}: pair {i} compares {s} student channels with {t} teacher "
                    "channels; add a transform mapping the teacher to the student's channels, "
                    "or use fitnets"
                )

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        return {"l2": self.weight * sum(F.mse_loss(s, t) for s, t in self.feature_pairs(batch))}
