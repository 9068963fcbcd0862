"""KD: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

The student matches the teacher's temperature-softened class probabilities:
``weight * KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over the
batch. Section 4.1 uses T = 4 with lambda = 16 on CIFAR-100 and 9 on ImageNet. 16 is T^2 for
T = 4, so lambda is read here as the *total* multiplier of the softened KL: no further T^2
factor is applied (that would make 16 * 16 = 256). ``t_squared=True`` multiplies by T^2 as
well, for Hinton's form with a separate lambda.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kcd.losses.base import DistillationLoss, DistillBatch, require_positive, softened_kl


class KDLoss(DistillationLoss):
    """Softened-logit KL divergence to the teacher; one term, ``kd``."""

    method = "kd"
    uses_logits = True
    uses_features = False

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int] = (),
        teacher_channels: Sequence[int] = (),
        transforms: Sequence[nn.Module | None] | None = None,
        *,
        temperature: float = 4.0,
        t_squared: bool = False,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        require_positive(self.method, "temperature", temperature)
        self.temperature = float(temperature)
        self.t_squared = bool(t_squared)

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        assert batch.teacher_logits is not None  # checked by validate()
        scale = self.weight * (self.temperature**2 if self.t_squared else 1.0)
        kl = softened_kl(batch.student_logits, batch.teacher_logits, self.temperature)
        return {"kd": scale * kl}
