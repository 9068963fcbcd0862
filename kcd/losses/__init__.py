"""Distillation losses: the compared methods of Section 4.1 and the paper's "Ours".

Every method is a :class:`DistillationLoss` registered in :data:`LOSSES` under its name, with
the paper's default weight:

=========  ==========================================================  ==============
name       method                                                      default weight
=========  ==========================================================  ==============
kd         Hinton et al. KD, T = 4                                     16
fitnets    FitNets hint with a 1x1 conv + BN regressor                 1e2
at         Attention transfer, p = 2                                   1e3
ab         Activation boundaries (pre-ReLU), margin 1                  10
rkd        Relational KD, distance : angle = 1 : 2                     10
rco        Route-constrained hint + KD to the current teacher anchor   1e2
l2         "Ours": feature L2 to the transformed teacher (Eq. 9)       1e2
=========  ==========================================================  ==============

Section 4.1 gives KD's lambda as 16 on CIFAR-100 and 9 on ImageNet, and the L2 weight on COCO
as 1e-4; those dataset-specific values live in the configs. It gives no L2 weight for
classification; 1e2 (FitNets') is this package's choice. A KCD run is a method plus a
transform (``build_loss("fitnets", ..., transforms=[t])``).

``baseline`` (cross-entropy only) has no distillation loss: the training loop handles it
without building one, and :func:`build_loss` refuses it with a message saying so.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from kcd.errors import KcdError
from kcd.losses.ab import ABLoss
from kcd.losses.at import ATLoss
from kcd.losses.base import DistillationLoss, DistillBatch
from kcd.losses.fitnets import FitNetsLoss
from kcd.losses.kd import KDLoss
from kcd.losses.l2 import L2Loss
from kcd.losses.rco import AnchorSchedule, RCOLoss
from kcd.losses.rkd import RKDLoss
from kcd.registry import Registry

BASELINE = "baseline"
"""The method name for training with cross-entropy only (no distillation loss)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered distillation method: its loss class and the paper's default weight."""

    name: str
    cls: type[DistillationLoss]
    default_weight: float
    description: str

    @property
    def default_options(self) -> dict[str, Any]:
        """The method's options and their defaults (the keyword-only arguments of ``cls``)."""
        parameters = inspect.signature(self.cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def uses_features(self) -> bool:
        """Whether the loss reads feature pairs."""
        return self.cls.uses_features

    @property
    def uses_logits(self) -> bool:
        """Whether the loss reads the teacher's logits."""
        return self.cls.uses_logits


LOSSES: Registry[MethodSpec] = Registry("distillation method")


def _register(cls: type[DistillationLoss], default_weight: float, description: str) -> None:
    LOSSES.register(cls.method, MethodSpec(cls.method, cls, default_weight, description))


_register(KDLoss, 16.0, "Hinton et al. KD: softened-logit KL to the teacher (T=4)")
_register(FitNetsLoss, 1e2, "FitNets: L2 between regressed student feature and teacher feature")
_register(ATLoss, 1e3, "Attention transfer: L2 between normalised spatial attention maps")
_register(ABLoss, 10.0, "Activation boundaries: margin loss on pre-ReLU features via a connector")
_register(RKDLoss, 10.0, "Relational KD: distance and angle relations between samples")
_register(RCOLoss, 1e2, "Route-constrained optimisation: hint + KD to the current teacher anchor")
_register(L2Loss, 1e2, "Ours: L2 between student feature and transformed teacher feature (Eq. 9)")


def build_loss(
    name: str,
    student_channels: Sequence[int],
    teacher_channels: Sequence[int],
    transforms: Sequence[nn.Module | None] | None = None,
    weight: float | None = None,
    **options: Any,
) -> DistillationLoss:
    """Build the loss of method ``name`` for the given feature pairs.

    ``weight`` None takes the paper's default; ``options`` override the method's
    :attr:`MethodSpec.default_options` (e.g. ``temperature`` for ``kd``).
    """
    if name == BASELINE:
        raise KcdError(
            f"'{BASELINE}' trains with cross-entropy only and has no distillation loss; "
            f"distillation methods: {', '.join(LOSSES.names())}"
        )
    spec = LOSSES.get(name)
    unknown = sorted(set(options) - set(spec.default_options))
    if unknown:
        accepted = ", ".join(spec.default_options) or "none"
        raise KcdError(
            f"unknown option(s) {', '.join(unknown)} for distillation method '{name}'; "
            f"accepted: {accepted}"
        )
    return spec.cls(
        spec.default_weight if weight is None else weight,
        student_channels,
        teacher_channels,
        transforms,
        **options,
    )


__all__ = [
    "ABLoss",
    "ATLoss",
    "AnchorSchedule",
    "BASELINE",
    "DistillBatch",
    "DistillationLoss",
    "FitNetsLoss",
    "KDLoss",
    "L2Loss",
    "LOSSES",
    "MethodSpec",
    "RCOLoss",
    "RKDLoss",
    "build_loss",
]
