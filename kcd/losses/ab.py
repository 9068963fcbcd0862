"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons" (AAAI 2019).

The student learns where the teacher's neurons switch on: a trainable connector (1x1
convolution + batch norm, student -> teacher channels) maps the student's *pre-ReLU* feature
to ``c``, and with the teacher's pre-ReLU feature ``t`` and margin ``m`` each element costs

    (c + m)^2 * 1[c > -m and t <= 0]  +  (c - m)^2 * 1[c <= m and t > 0],

the hinge-squared form of the activation-transfer loss. As in the authors' reference code
the elements are summed and divided by ``batch size * 1000``; pairs are summed. The loss is
``weight * that`` (Section 4.1: weight 10). Which tensor is pre-ReLU is the feature
extractor's business: this loss uses the features it is given.

AB first trains the student's layers and the connectors with this loss alone (the
"initialization" iterations, ``distill.init_iterations``), then trains normally:
:meth:`ABLoss.stages` puts that stage before the main one, with the unweighted loss of
:meth:`ABLoss.initialization_loss` and no cross-entropy, and with an SGD of its own (the
recipe's learning rate, momentum and weight decay, without Nesterov or a schedule). With a
transform the target is ``T(F^T)`` and the connector maps to the transform's ``c_s`` channels.

After the initialisation stage, option ``throughout`` decides whether the weighted AB term
stays in the loss. Default True: Section 4.1 gives AB a loss weight (10) "to balance" like the
other methods', which only has a meaning when AB is trained together with the cross-entropy,
and "Ours + AB" applies the transform "before calculating their distillation losses". False
is the reading of the AB authors' code and of the common KD benchmarks (e.g. RepDistiller),
which use the AB loss in the initialisation stage only and then train without it
(``methods.ab.options.throughout: false``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from torch import Tensor, nn

from kcd.errors import KcdError
from kcd.losses.base import (
    DistillationLoss,
    DistillBatch,
    DistillContext,
    Stage,
    connector,
    require_positive,
)
from kcd.optim import sgd

REFERENCE_SCALE = 1000.0
"""The authors' code divides the summed margin loss by batch size and by this constant."""


class ABLoss(DistillationLoss):
    """Activation-boundary transfer with a margin; one term, ``ab``."""

    method = "ab"

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
        *,
        margin: float = 1.0,
        throughout: bool = True,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        require_positive(self.method, "margin", margin)
        self.margin = float(margin)
        self.throughout = bool(throughout)
        self.connectors = nn.ModuleList(
            connector(s, t) for s, t in zip(self.student_channels, self.target_channels)
        )

    def margin_loss(self, batch: DistillBatch) -> Tensor:
        """The unweighted activation-boundary loss of a validated batch, summed over pairs."""
        m = self.margin
        total = 0.0
        for conn, (s, t) in zip(self.connectors, self.feature_pairs(batch)):
            c = conn(s)
            below = (c + m).pow(2) * ((c > -m) & (t <= 0))
            above = (c - m).pow(2) * ((c <= m) & (t > 0))
            per_element = below + above
            total = total + per_element.sum() / (len(s) * REFERENCE_SCALE)
        return total

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        """The weighted AB term after the initialisation stage (none unless ``throughout``)."""
        if not self.throughout:
            return {}
        return {"ab": self.weight * self.margin_loss(batch)}

    def initialization_loss(self, batch: DistillBatch) -> dict[str, Tensor]:
        """The loss of AB's initialization stage, to be used alone (no cross-entropy, no weight)."""
        self.validate(batch)
        return {"ab_init": self.margin_loss(batch)}

    def setup(self, run: DistillContext) -> None:
        """Take ``distill.init_iterations`` (0: no initialisation stage)."""
        self.refuse(run, "anchors")
        n = run.spec.init_iterations
        if not isinstance(n, int) or n < 0:
            raise KcdError(f"distill.init_iterations must be an integer >= 0, got {n!r}")

    def stages(self, run: DistillContext) -> list[Stage]:
        """The initialisation stage (if ``distill.init_iterations``), then the main stage."""
        main = super().stages(run)
        n = run.spec.init_iterations
        if not n:
            return main
        recipe = dataclasses.replace(run.recipe, nesterov=False)  # plain momentum SGD
        return [Stage("init", n, self.initialization_loss, cross_entropy=False,
                      optimizer=lambda params: sgd(params, recipe)), *main]
