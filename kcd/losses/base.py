"""What every distillation loss shares: the batch it reads, validation and the teacher view.

A loss is built for a list of (teacher layer, student layer) pairs, the set Omega of the paper's
Eq. 2, given by their channel counts. Each pair may carry a transform T_(k,k') (Section 3.3);
the loss then compares the student with T(F_k^T) instead of F_k^T, which is the paper's Eq. 9.
The same classes therefore serve both a classic method ("FitNets") and its KCD variant
("Ours + FitNets"): only the transform differs.

A transform is any ``nn.Module`` called as ``t(x, labels=None)`` that maps teacher features
``b x c_t x ...`` to ``b x c_s x ...`` and exposes the integer attributes ``c_t`` and ``c_s``.
Algorithm 1 computes it before distillation starts (step 5), so during distillation it is
fixed: a loss freezes its transforms, keeps them in eval mode and runs them without gradient.
They are registered as submodules only so that ``loss.to(device)`` moves them too.

A loss also owns its place in the training schedule, through optional hooks the training
loop calls without knowing the method (their defaults make a loss that is simply added to the
cross-entropy for the recipe's iterations):

- :meth:`DistillationLoss.setup` once before training, with the run's
  :class:`DistillContext`: take and check the method's settings of the spec (the base class
  refuses an initialisation stage and a route of teacher anchors, which it would ignore);
- :meth:`DistillationLoss.stages`: the stages of training in order (:class:`Stage`): AB puts
  its initialisation stage, with an optimizer of its own, before the main stage;
- :meth:`DistillationLoss.before_step` and :meth:`DistillationLoss.after_step` around each
  iteration of the main stage (RCO switches the teacher to the anchor its route prescribes).

The iteration also travels in the batch (:attr:`DistillBatch.iteration`), so a loss whose
weight follows a schedule (a warm-up, say) needs nothing but its :meth:`terms`.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kcd.errors import KcdError
from kcd.specs import DistillSpec, Recipe


@dataclass
class DistillBatch:
    """The inputs of one distillation step.

    ``student_features[i]`` and ``teacher_features[i]`` are the two sides of the i-th
    (teacher layer, student layer) pair, in the order the loss was built with. Teacher
    tensors come from the teacher in eval mode under ``torch.no_grad()``; for RCO they are
    the outputs of the current anchor checkpoint.
    """

    labels: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None = None
    student_features: list[Tensor] = field(default_factory=list)
    teacher_features: list[Tensor] = field(default_factory=list)
    iteration: int = 0
    """The 0-based iteration of the main stage; negative in the stages before it (-2 and -1 in
    a two-iteration initialisation stage)."""


OptimizerFactory = Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Stage:
    """One stage of training: its length, its loss terms and its optimizer.

    The main stage (``optimizer`` None) is the recipe's: ``recipe.iterations`` iterations of
    the run's optimizer and learning-rate schedule, with the cross-entropy. A stage before it
    (AB's initialisation) names how its optimizer is built from the parameters (the student's
    and the losses' trainable ones); its learning rate stays constant.
    """

    name: str
    iterations: int
    terms: Callable[[DistillBatch], dict[str, Tensor]]  # the named, weighted terms of a batch
    cross_entropy: bool = True  # the task's cross-entropy joins the terms
    optimizer: OptimizerFactory | None = None  # None: the run's optimizer and schedule

    @property
    def main(self) -> bool:
        """Whether this is the main stage (the run's optimizer and learning-rate schedule)."""
        return self.optimizer is None


@dataclass
class DistillContext:
    """What a loss's hooks may use of the run they are part of: the distillation spec (the
    method's settings: ``init_iterations``, ``anchors``...), the recipe, and loading a weights
    file of the teacher's architecture into the teacher (RCO's anchors). The training engine
    fills it in; losses never import the engine."""

    spec: DistillSpec
    recipe: Recipe
    load_teacher: Callable[[str, str], None]  # (weights file, what it is, for errors)


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """A trainable 1x1 convolution followed by batch norm (FitNets' regressor, AB's connector)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def softened_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) summed over classes and averaged over the batch.

    The teacher's logits are a fixed target: no gradient flows into them.
    """
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
    )


def require_positive(method: str, option: str, value: float) -> None:
    """Raise :class:`KcdError` unless ``value`` is a finite number above zero."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise KcdError(f"{method}: option '{option}' must be a positive number, got {value!r}")


def _size(x: Tensor) -> str:
    return "x".join(str(s) for s in x.shape[2:]) or "no spatial dimensions"


class DistillationLoss(nn.Module, abc.ABC):
    """Base class: validates the pairs and the batch, and applies the per-pair transforms.

    Subclasses set ``method`` (the registry name, used in error messages), ``uses_logits``
    and ``uses_features``, take their own options as keyword-only ``__init__`` arguments
    (their defaults are the registry's default options), and implement :meth:`terms`.
    :meth:`forward` returns named loss terms, each already multiplied by its weight; the
    training loop adds them to the cross-entropy loss. Trainable parts (regressors,
    connectors) are submodules, so ``loss.parameters()`` goes into the optimizer with the
    student's parameters.
    """

    method: ClassVar[str]
    uses_logits: ClassVar[bool] = False
    uses_features: ClassVar[bool] = True

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise KcdError(f"{self.method}: the loss weight must be a number >= 0, got {weight!r}")
        if len(student_channels) != len(teacher_channels):
            raise KcdError(
                f"{self.method}: {len(teacher_channels)} teacher layers but "
                f"{len(student_channels)} student layers; give one of each per pair"
            )
        if self.uses_features and not student_channels:
            raise KcdError(f"{self.method} needs at least one (teacher, student) feature pair")
        transforms = list(transforms) if transforms is not None else [None] * len(student_channels)
        if len(transforms) != len(student_channels):
            raise KcdError(
                f"{self.method}: {len(transforms)} transforms for {len(student_channels)} "
                "feature pairs; give one (or None) per pair"
            )
        if not self.uses_features and any(t is not None for t in transforms):
            raise KcdError(
                f"{self.method} uses logits only; a feature transform has no effect on it"
            )
        self.weight = float(weight)
        self.student_channels = list(student_channels)
        self.teacher_channels = list(teacher_channels)
        self.target_channels = [
            self._check_transform(i, t) if t is not None else c
            for i, (t, c) in enumerate(zip(transforms, self.teacher_channels))
        ]
        self.transforms = nn.ModuleDict(
            {
                str(i): t.requires_grad_(False).eval()
                for i, t in enumerate(transforms)
                if t is not None
            }
        )

    def _check_transform(self, i: int, transform: nn.Module) -> int:
        """Check the transform of pair ``i`` against its teacher layer; return its ``c_s``."""
        c_t, c_s = getattr(transform, "c_t", None), getattr(transform, "c_s", None)
        if not isinstance(c_t, int) or not isinstance(c_s, int):
            raise KcdError(
                f"{self.method}: the transform of pair {i} ({type(transform).__name__}) "
                "lacks integer attributes c_t and c_s"
            )
        if c_t != self.teacher_channels[i]:
            raise KcdError(
                f"{self.method}: the transform of pair {i} expects {c_t} teacher channels "
                f"but the teacher layer has {self.teacher_channels[i]}"
            )
        return c_s

    def train(self, mode: bool = True) -> DistillationLoss:
        """Set train/eval mode for the trainable parts; transforms always stay in eval mode."""
        super().train(mode)
        self.transforms.eval()
        return self

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        """Validate ``batch`` and return the named, weighted loss terms."""
        self.validate(batch)
        return self.terms(batch)

    # ----------------------------------------------------------------- training hooks

    def setup(self, run: DistillContext) -> None:
        """Take the run's settings before training starts (called once, before :meth:`stages`).

        The base class has no initialisation stage and follows no route of teacher anchors,
        so it refuses both rather than ignore them; a subclass that takes one of them handles
        it and passes the other to :meth:`refuse`.
        """
        self.refuse(run, "init_iterations", "anchors")

    def refuse(self, run: DistillContext, *settings: str) -> None:
        """Raise :class:`KcdError` if the spec sets any of ``settings``, which this method
        does not use (``init_iterations``, ``anchors``)."""
        what = {"init_iterations": "an initialisation stage",
                "anchors": "a route of teacher anchors"}
        for name in settings:
            if getattr(run.spec, name):
                raise KcdError(f"distill.{name} is only for methods with {what[name]}, "
                               f"not '{self.method}'")

    def stages(self, run: DistillContext) -> list[Stage]:
        """The stages of training in order; the default is the main stage alone, in which
        this loss is added to the cross-entropy."""
        return [Stage("main", run.recipe.iterations, self)]

    def before_step(self, iteration: int, run: DistillContext) -> None:
        """Called before each iteration of the main stage (0-based), before its batch."""

    def after_step(self, iteration: int, run: DistillContext) -> None:
        """Called after each iteration of the main stage, once the optimizer has stepped."""

    @abc.abstractmethod
    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        """The named loss terms of a validated batch, each multiplied by its weight."""

    def validate(self, batch: DistillBatch) -> None:
        """Raise :class:`KcdError` when ``batch`` does not fit what this loss was built for."""
        if self.uses_logits:
            if batch.teacher_logits is None:
                raise KcdError(
                    f"{self.method} needs the teacher's logits but batch.teacher_logits is None"
                )
            if batch.teacher_logits.shape != batch.student_logits.shape:
                raise KcdError(
                    f"{self.method}: teacher logits {tuple(batch.teacher_logits.shape)} and "
                    f"student logits {tuple(batch.student_logits.shape)} differ in shape"
                )
        if not self.uses_features:
            return
        pairs = len(self.student_channels)
        if len(batch.student_features) != pairs or len(batch.teacher_features) != pairs:
            raise KcdError(
                f"{self.method}: built for {pairs} feature pairs but got "
                f"{len(batch.student_features)} student and "
                f"{len(batch.teacher_features)} teacher features"
            )
        for i, (s, t) in enumerate(zip(batch.student_features, batch.teacher_features)):
            sides = (
                ("student", s, self.student_channels[i]),
                ("teacher", t, self.teacher_channels[i]),
            )
            for side, x, expected in sides:
                if x.dim() < 2 or x.shape[1] != expected:
                    got = x.shape[1] if x.dim() >= 2 else f"a {x.dim()}-d tensor"
                    raise KcdError(
                        f"{self.method}: {side} feature of pair {i} should have "
                        f"{expected} channels, got {got}"
                    )
            if s.shape[0] != t.shape[0]:
                raise KcdError(
                    f"{self.method}: pair {i} has {s.shape[0]} student samples but "
                    f"{t.shape[0]} teacher samples"
                )

    def teacher_view(self, batch: DistillBatch, i: int) -> Tensor:
        """The teacher side of pair ``i``, transformed (given the labels) if it has a transform.

        The result is detached: the teacher and the transform are fixed targets.
        """
        teacher = batch.teacher_features[i].detach()
        if not self.has_transform(i):
            return teacher
        with torch.no_grad():
            teacher = self.transforms[str(i)](teacher, labels=batch.labels)
        if teacher.shape[1] != self.target_channels[i]:
            raise KcdError(
                f"{self.method}: the transform of pair {i} returned {teacher.shape[1]} channels "
                f"but declares c_s={self.target_channels[i]}"
            )
        return teacher

    def has_transform(self, i: int) -> bool:
        """Whether pair ``i`` has a transform."""
        return str(i) in self.transforms

    def feature_pairs(
        self, batch: DistillBatch, *, same_size: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """``(student feature, teacher view)`` for every pair.

        With ``same_size`` the spatial sizes must agree: features are never interpolated, so
        the layers of a pair have to be chosen with the same resolution.
        """
        pairs = []
        for i, student in enumerate(batch.student_features):
            teacher = self.teacher_view(batch, i)
            if same_size:
                self.require_same_size(i, student, teacher)
            pairs.append((student, teacher))
        return pairs

    def require_same_size(self, i: int, student: Tensor, teacher: Tensor) -> None:
        """Raise :class:`KcdError` unless pair ``i``'s two features have the same spatial size."""
        if student.shape[2:] != teacher.shape[2:]:
            raise KcdError(
                f"{self.method}: pair {i} has a {_size(student)} student feature but a "
                f"{_size(teacher)} teacher feature; pick layers of the same spatial size "
                "(features are not interpolated)"
            )

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight:g}, student_channels={self.student_channels}, "
            f"teacher_channels={self.teacher_channels}, target_channels={self.target_channels}"
        )
