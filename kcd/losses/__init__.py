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

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from kcd.errors import KcdError
from kcd.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from kcd.losses.base import DistillationLoss

BASELINE = "baseline"
"""The method name for training with cross-entropy only (no distillation loss)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered distillation method: where its loss class lives, the paper's default
    weight and the names of its options.

    The registry is light (no torch), so the workflow validates a config's methods and
    options without importing the losses; :attr:`cls` imports the class and checks that
    ``options`` are the keyword-only arguments of its ``__init__``.
    """

    name: str
    loss: str  # "module:Class"
    default_weight: float
    description: str
    options: tuple[str, ...] = ()
    label: str = ""  # its row in the tables ("KD"); "Ours + <label>" with the KCD transform
    features: bool = True  # reads feature pairs (so the KCD transform applies to it)

    @property
    def cls(self) -> type[DistillationLoss]:
        module, name = self.loss.split(":")
        cls = getattr(importlib.import_module(module), name)
        accepted = tuple(p.name for p in inspect.signature(cls.__init__).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)
        if accepted != self.options:
            raise KcdError(f"distillation method '{self.name}': its registry entry declares "
                           f"options {list(self.options)} but {self.loss} accepts "
                           f"{list(accepted)}; make them agree in kcd/losses/__init__.py")
        if cls.uses_features != self.features:
            raise KcdError(f"distillation method '{self.name}': its registry entry says "
                           f"features={self.features} but {self.loss}.uses_features is "
                           f"{cls.uses_features}; make them agree in kcd/losses/__init__.py")
        return cls

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


def _register(name: str, loss: str, default_weight: float, description: str,
              options: tuple[str, ...] = (), label: str = "", features: bool = True) -> None:
    LOSSES.register(name, MethodSpec(name, f"kcd.losses.{loss}", default_weight, description,
                                     options, label or name.upper(), features))


_register("kd", "kd:KDLoss", 16.0, "Hinton et al. KD: softened-logit KL to the teacher (T=4)",
          ("temperature", "t_squared"), label="KD", features=False)
_register("fitnets", "fitnets:FitNetsLoss", 1e2,
          "FitNets: L2 between regressed student feature and teacher feature", label="FitNets")
_register("at", "at:ATLoss", 1e3,
          "Attention transfer: L2 between normalised spatial attention maps", ("p",),
          label="AT")
_register("ab", "ab:ABLoss", 10.0,
          "Activation boundaries: margin loss on pre-ReLU features via a connector",
          ("margin", "throughout"), label="AB")
_register("rkd", "rkd:RKDLoss", 10.0,
          "Relational KD: distance and angle relations between samples",
          ("dist_weight", "angle_weight", "l2_weight"), label="RKD")
_register("rco", "rco:RCOLoss", 1e2,
          "Route-constrained optimisation: hint + KD to the current teacher anchor",
          ("kd_weight", "temperature"), label="RCO")
_register("l2", "l2:L2Loss", 1e2,
          "Ours: L2 between student feature and transformed teacher feature (Eq. 9)",
          label="L2")

# The loss classes, importable from kcd.losses (loaded on first use: the registry above
# must not import torch).
_EXPORTS = {
    "ABLoss": "ab", "ATLoss": "at", "FitNetsLoss": "fitnets", "KDLoss": "kd", "L2Loss": "l2",
    "RCOLoss": "rco", "AnchorSchedule": "rco", "RKDLoss": "rkd", "DistillBatch": "base",
    "DistillationLoss": "base",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kcd.losses.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kcd.losses' has no attribute '{name}'")


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
