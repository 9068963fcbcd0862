"""FitNets: Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

Hint learning: a trainable regressor maps the student's feature to the teacher's channel
count and the mean-squared error to the teacher's feature is minimised:
``weight * sum over pairs of MSE(regressor(F^S), F^T)``. The regressor is a 1x1 convolution
followed by batch norm, as in common reimplementations, and is always present (also when the
channel counts already agree). With a transform, the target is the transformed teacher
``T(F^T)`` ("Ours + FitNets", Section 4.1) and the regressor maps to the transform's ``c_s``
channels. Section 4.1's weight is 1e2. FitNets' original two-stage schedule (hint
pre-training, then KD) is not reproduced: the hint and the task loss are trained jointly, as
in the common reimplementations.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kcd.losses.base import DistillationLoss, DistillBatch, connector


class FitNetsLoss(DistillationLoss):
    """Regressed-hint L2 to the (transformed) teacher feature; one term, ``fitnets``."""

    method = "fitnets"

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        self.regressors = nn.ModuleList(
            connector(s, t) for s, t in zip(self.student_channels, self.target_channels)
        )

    def hint(self, batch: DistillBatch) -> Tensor:
        """Unweighted hint loss: the sum over pairs of MSE(regressor(student), teacher view)."""
        pairs = self.feature_pairs(batch)
        return sum(F.mse_loss(reg(s), t) for reg, (s, t) in zip(self.regressors, pairs))

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        return {"fitnets": self.weight * self.hint(batch)}
