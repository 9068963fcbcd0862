"""The resumable run loop the training engines share: classification (:mod:`kcd.train`) and
detection (:mod:`kcd.detection`).

A task (:class:`RunTask`) owns what is particular to its kind of job: its models, optimizers and
data, one optimizer step, its part of the checkpoint, the final weights and the evaluation. The
loop (:func:`run`) owns what every job does the same way:

- resume from ``checkpoint.pt`` when there is one, refusing a checkpoint of another version of
  the spec (:func:`kcd.specs.fingerprint`: run-time fields and tags may differ);
- run the task's steps with a progress bar, and log the mean of each loss term and the learning
  rate every ``recipe.log_every`` steps;
- write an atomic checkpoint (the task's state, the step and every RNG state) every
  ``recipe.checkpoint_every`` steps (:func:`checkpoint_every`), so that a rerun of the same
  command resumes and ends with the weights of an uninterrupted run on the CPU;
- finish: the task writes ``final.pt`` and evaluates, the loop logs the evaluation, writes
  ``result.json`` last (its presence means done) and removes the checkpoint.

Under torch.distributed every rank runs the loop; only the task's rank 0 logs, writes
checkpoints and the result.
"""
from __future__ import annotations

import abc
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from kcd.checkpoint import atomic_save, atomic_write_json, load_file, rng_state, set_rng_state
from kcd.errors import KcdError
from kcd.specs import Recipe, fingerprint

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
RESULT = "result.json"


class Tracker(Protocol):
    """What the engines need from experiment tracking (see :mod:`kcd.tracking`)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...


class NullTracker:
    """A tracker that keeps nothing (runs without tracking)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass


TIMINGS = ("train_seconds", "phases")
"""Keys of a result that time the run: two runs computing the same thing differ only there."""

RESULT_PARAMS = ("iterations", "seed", "train_seconds", "eval_images", "threads")
"""Numbers of a result that describe the run rather than measure it: tracked as params.
``threads`` is the CPU threads the run computed on (``torch.get_num_threads()``): a job's
``resources.cpus``, or every core for ``kcd`` run by hand. At the demo's short budgets another
thread count rounds differently and can move a result by several points."""


class Phases:
    """Wall seconds per phase of a job, a result's ``phases`` (``bench/bench_demo.py`` sums
    them over a whole workflow): ``with phases("evaluate"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        return {name: round(s, 3) for name, s in self.seconds.items()}


def checkpoint_every(recipe: Recipe) -> int:
    """Steps between checkpoints: ``recipe.checkpoint_every``, or a tenth of the iterations."""
    return recipe.checkpoint_every or max(1, recipe.iterations // 10)


class FiniteGuard:
    """NaN/inf watch on the loss without a host synchronisation per step.

    :meth:`total` sums a step's terms and records, on their device, the first iteration whose
    total is not finite and which terms were not; :meth:`check` reads that back once and raises
    :class:`KcdError` naming the term, its value, the iteration and ``advice``. The run loop
    checks at every logging step, before every checkpoint and at the end, so no checkpoint or
    result is written after a non-finite loss.
    """

    def __init__(self, advice: str) -> None:
        self.advice = advice
        self._first: Tensor | None = None  # the first bad iteration, -1 while none
        self._names: list[str] = []
        self._values: Tensor | None = None  # the terms' values at that iteration

    def total(self, terms: Mapping[str, Tensor], iteration: int) -> Tensor:
        total = sum(terms.values())
        names = list(terms)
        if self._first is None or names != self._names:  # first step, or another stage
            self.check()
            self._names = names
            self._first = torch.full((), -1, dtype=torch.long, device=total.device)
            self._values = torch.zeros(len(names) + 1, device=total.device)
        values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]
                             + [total.detach().float().reshape(())])
        new = ~torch.isfinite(values[-1]) & (self._first < 0)
        self._first = torch.where(new, torch.full_like(self._first, iteration), self._first)
        self._values = torch.where(new, values, self._values)
        return total

    def check(self) -> None:
        """Raise if a recorded total was not finite (one host synchronisation)."""
        if self._first is None or int(self._first) < 0:
            return
        values = self._values.tolist()
        bad = [(n, v) for n, v in zip(self._names, values) if not math.isfinite(v)]
        name, value = bad[0] if bad else ("total", values[-1])
        raise KcdError(f"loss term '{name}' is {value} at iteration {int(self._first)}; lower the "
                       f"learning rate or {self.advice}")


def divergence_advice(dataset: str, arch: str, method: str | None) -> str:
    """What to lower when a run diverges, as config keys: the recipe's learning rate (its
    ``default`` or the architecture's entry) and the method's weight."""
    lr = f"(config key recipes.{dataset}.default.lr, or recipes.{dataset}.{arch}.lr)"
    weight = f" or the method's weight (methods.{method}.weight)" if method else ""
    return f"{lr}{weight}"


class RunTask(abc.ABC):
    """One training job as :func:`run` drives it.

    Built fully before the loop starts (the loop then restores a checkpoint into it, RNG states
    last). Attributes a task sets:

    - ``steps``: optimizer steps in all, every stage included;
    - ``iterations``: the main stage's iterations, the step the evaluation is logged at;
    - ``description``: the progress bar's label;
    - ``rank``: the process's rank (0 without torch.distributed); only rank 0 logs, writes
      checkpoints and finishes with a result;
    - ``phases``: set by the loop before the first step; :meth:`finish` times its parts in it
      (``save``, ``evaluate``);
    - ``guard`` (optional): a :class:`FiniteGuard` whose ``total`` the step sums its loss with;
      the loop checks it at logging steps, before checkpoints and at the end.
    """

    steps: int
    iterations: int
    description: str = ""
    rank: int = 0
    phases: Phases | None = None  # set by the loop: the task times its own phases in it

    @abc.abstractmethod
    def step(self, step: int) -> Mapping[str, Tensor | float]:
        """Take optimizer step ``step`` (0-based, counting every stage); return the loss terms
        by name: 0-d tensors (summed where they are and read back at log time) or floats."""

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate of the optimizer of the latest step."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The task's part of a checkpoint (the loop adds the step, the spec's fingerprint and
        the RNG states); its keys must not be ``spec_hash``, ``step`` or ``rng``."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (given the whole checkpoint)."""

    def close(self) -> None:
        """Release what the steps hold (feature taps, data workers), also after an error."""

    @abc.abstractmethod
    def finish(self, train_seconds: float) -> dict | None:
        """Write the final weights, evaluate and return the result (None on a rank but 0)."""

    def eval_metrics(self, result: dict) -> dict[str, float]:
        """The evaluation metrics to track, from the result: its numbers by default, except
        :data:`RESULT_PARAMS` and flags."""
        return {f"eval/{k}": v for k, v in result.items() if k not in RESULT_PARAMS
                and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def result_params(self, result: dict) -> dict[str, Any]:
        """The result's :data:`RESULT_PARAMS`, tracked as params."""
        return {f"result.{k}": result[k] for k in RESULT_PARAMS if k in result}


def _check(task: RunTask) -> None:
    guard = getattr(task, "guard", None)
    if guard is not None:
        guard.check()


def run(spec: Any, task: RunTask, tracker: Tracker | None = None, progress: bool = True,
        phases: Phases | None = None) -> dict:
    """Run (or resume) ``task`` for ``spec`` (a :class:`~kcd.specs.TrainSpec` or
    :class:`~kcd.specs.DetectionSpec`: its ``recipe`` and ``out_dir``); return its result, also
    written to ``result.json`` (an empty dict on a rank but 0) with the seconds of each phase
    (``phases``: the caller's, e.g. ``setup``, then ``train``, ``checkpoint`` and the task's)."""
    tracker = tracker or NullTracker()
    phases = task.phases = phases or Phases()
    r: Recipe = spec.recipe
    out = Path(spec.out_dir)
    ckpt_path = out / CHECKPOINT
    spec_hash = fingerprint(spec)
    leader = task.rank == 0
    bar = None
    try:
        step = 0
        if ckpt_path.exists():
            state = load_file(ckpt_path, "checkpoint")
            if not isinstance(state, dict) or state.get("spec_hash") != spec_hash:
                raise KcdError(f"checkpoint {ckpt_path} belongs to another version of this run "
                               "(its spec changed); delete it to start over")
            task.load_state_dict(state)
            set_rng_state(state["rng"])
            step = state["step"]
            if leader:
                print(f"kcd: resuming {out} from its checkpoint at step {step} of {task.steps}",
                      file=sys.stderr, flush=True)
        every = checkpoint_every(r)
        logged: dict[str, Any] = {}
        n_logged = 0
        started = time.time()
        bar = tqdm(total=task.steps, initial=step, desc=task.description,
                   disable=not progress or not leader,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        while step < task.steps:
            terms = task.step(step)
            step += 1
            bar.update(1)
            for name, v in terms.items():
                logged[name] = logged.get(name, 0.0) + v
            n_logged += 1
            if n_logged >= r.log_every or step == task.steps:
                _check(task)
                metrics = {f"train/{name}": float(v) / n_logged for name, v in logged.items()}
                metrics["train/lr"] = task.lr
                if leader:
                    tracker.log_metrics(metrics, step)
                bar.set_postfix(loss=f"{float(sum(logged.values())) / n_logged:.3f}")
                logged, n_logged = {}, 0
            if leader and step % every == 0 and step < task.steps:
                _check(task)
                with phases("checkpoint"):
                    atomic_save({"spec_hash": spec_hash, "step": step, **task.state_dict(),
                                 "rng": rng_state()}, ckpt_path)
    finally:
        if bar is not None:
            bar.close()
        task.close()
    _check(task)
    train_seconds = time.time() - started
    phases.add("train", train_seconds - phases.seconds.get("checkpoint", 0.0))
    result = task.finish(train_seconds)
    if result is None:
        return {}
    result["threads"] = torch.get_num_threads()
    result["phases"] = phases.as_dict()
    tracker.log_metrics(task.eval_metrics(result), task.iterations)
    if hasattr(tracker, "log_params"):  # trackers written before log_params existed
        tracker.log_params(task.result_params(result))
    atomic_write_json(result, out / RESULT)
    ckpt_path.unlink(missing_ok=True)
    return result
