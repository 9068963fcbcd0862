"""RCO: Jin et al., "Knowledge Distillation via Route Constrained Optimization" (ICCV 2019).

Instead of the converged teacher alone, the student follows a route of *anchor* checkpoints
saved while the teacher was trained, from an early one to the final teacher, switching to the
next anchor as its own training goes on. :class:`AnchorSchedule` says which anchor is current
at each student iteration; before each iteration :meth:`RCOLoss.before_step` has the training
loop load that anchor's weights into the teacher (``distill.anchors``, in route order; without
anchors the teacher stays the final one), so the loss itself only ever sees "the teacher's
outputs" in the batch, which are the current anchor's.

The loss follows the anchor with both of RCO's signals:

* ``rco_hint = weight * sum over pairs of MSE(regressor(F^S), F^A)`` with the FitNets
  regressor (1x1 conv + BN); Section 4.1's weight 1e2. Section 4.1 applies the KCD transform
  to RCO's *feature maps* ("we just have to apply our transformation before calculating their
  distillation losses"), so this reading of RCO includes a feature hint term, and with a
  transform the target is ``T(F^A)``;
* ``rco_kd = kd_weight * KL(softmax(z^A / T) || softmax(z^S / T))`` on the anchor's logits,
  with ``kd_weight`` 16 and ``temperature`` 4 as for KD.
"""
from __future__ import annotations

import os
from typing import Sequence

from torch import Tensor, nn

from kcd.errors import KcdError
from kcd.losses.base import DistillBatch, DistillContext, require_positive, softened_kl
from kcd.losses.fitnets import FitNetsLoss


class AnchorSchedule:
    """Maps a student iteration to the index of the current teacher anchor.

    The ``total_iterations`` are split into ``num_anchors`` equal spans: anchor ``k`` is
    current for iterations ``[k * total / n, (k + 1) * total / n)``; later iterations stay on
    the last anchor, which is the final teacher.
    """

    def __init__(self, num_anchors: int, total_iterations: int) -> None:
        for name, value in (("num_anchors", num_anchors), ("total_iterations", total_iterations)):
            if not isinstance(value, int) or value < 1:
                raise KcdError(f"rco: {name} must be a positive integer, got {value!r}")
        self.num_anchors = num_anchors
        self.total_iterations = total_iterations
        self._current: int | None = None

    def index(self, iteration: int) -> int:
        """The anchor index for a 0-based student ``iteration``."""
        if iteration < 0:
            raise KcdError(f"rco: the iteration must be >= 0, got {iteration}")
        return min(iteration * self.num_anchors // self.total_iterations, self.num_anchors - 1)

    def step(self, iteration: int) -> tuple[int, bool]:
        """The anchor index for ``iteration`` and whether it differs from the previous step's.

        The first step after construction or :meth:`load_state_dict` always reports a change,
        so the training loop loads the anchor's weights into a freshly built teacher.
        """
        index = self.index(iteration)
        changed = index != self._current
        self._current = index
        return index, changed

    def state_dict(self) -> dict[str, int]:
        """The schedule's definition, saved with a checkpoint."""
        return {"num_anchors": self.num_anchors, "total_iterations": self.total_iterations}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Check a checkpoint's schedule matches this one; the next step reports a change."""
        if state != self.state_dict():
            raise KcdError(
                f"rco: the checkpoint's anchor schedule {state} differs from the configured "
                f"{self.state_dict()}; resume with the same anchors and iterations"
            )
        self._current = None


class RCOLoss(FitNetsLoss):
    """Hint and KD to the current anchor; terms ``rco_hint`` and ``rco_kd``."""

    method = "rco"
    uses_logits = True

    def __init__(
        self,
        weight: float,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        transforms: Sequence[nn.Module | None] | None = None,
        *,
        kd_weight: float = 16.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        require_positive(self.method, "temperature", temperature)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.anchors: list[str] = []
        self.schedule: AnchorSchedule | None = None

    def terms(self, batch: DistillBatch) -> dict[str, Tensor]:
        assert batch.teacher_logits is not None  # checked by validate()
        kl = softened_kl(batch.student_logits, batch.teacher_logits, self.temperature)
        return {"rco_hint": self.weight * self.hint(batch), "rco_kd": self.kd_weight * kl}

    def setup(self, run: DistillContext) -> None:
        """Take the route of anchors (``distill.anchors``), which must all exist."""
        self.refuse(run, "init_iterations")
        self.anchors = list(run.spec.anchors)
        self.schedule = None
        if not self.anchors:
            return
        missing = [a for a in self.anchors if not os.path.isfile(a)]
        if missing:
            raise KcdError(f"RCO anchor {missing[0]} does not exist; the teacher's "
                           "pre-training writes its anchors (methods.rco.anchors)")
        self.schedule = AnchorSchedule(len(self.anchors), run.recipe.iterations)

    def before_step(self, iteration: int, run: DistillContext) -> None:
        """Load the anchor of ``iteration`` into the teacher when the route reaches a new one
        (and at the first iteration of a run or of a resumed run)."""
        if self.schedule is None:
            return
        index, changed = self.schedule.step(iteration)
        if changed:
            run.load_teacher(self.anchors[index], "RCO anchor")
