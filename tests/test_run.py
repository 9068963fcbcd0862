"""The run loop every engine shares (kcd.run), on a toy task: checkpoint cadence, exact resume
(RNG included), a changed spec refused, logging, the result written last, the NaN check."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kcd.checkpoint import load_file
from kcd.errors import KcdError
from kcd.run import CHECKPOINT, RESULT, FiniteGuard, RunTask, checkpoint_every, run
from kcd.specs import DataSpec, Recipe, TrainSpec


class Toy(RunTask):
    """Linear regression on batches drawn from the global RNG (so resuming must restore it)."""

    def __init__(self, spec: TrainSpec, fail_at: int | None = None,
                 nan_at: int | None = None) -> None:
        torch.manual_seed(spec.seed)
        self.guard = FiniteGuard("the weight")
        self.nan_at = nan_at
        self.w = torch.zeros(3, requires_grad=True)
        self.opt = torch.optim.SGD([self.w], lr=spec.recipe.lr, momentum=0.9)
        self.steps = self.iterations = spec.recipe.iterations
        self.fail_at = fail_at
        self.closed = False

    def step(self, step: int) -> dict[str, torch.Tensor]:
        if step == self.fail_at:
            raise KeyboardInterrupt("killed")
        x = torch.randn(8, 3)
        loss = ((x @ self.w - x.sum(1)) ** 2).mean()
        if step == self.nan_at:
            loss = loss * float("inf")
        terms = {"mse": loss}
        self.opt.zero_grad()
        self.guard.total(terms, step).backward()
        self.opt.step()
        return {"mse": loss.detach(), "half": 0.5}

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["optimizer"])

    def close(self) -> None:
        self.closed = True

    def finish(self, train_seconds: float) -> dict:
        return {"w": self.w.tolist(), "iterations": self.iterations, "train_seconds": 0.0}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, metrics))

    def log_params(self, params: dict) -> None:
        self.params = params


def _spec(tmp_path: Path, name: str, **recipe) -> TrainSpec:
    r = {"iterations": 7, "batch_size": 8, "lr": 0.05, "checkpoint_every": 3, "log_every": 2,
         **recipe}
    return TrainSpec(arch="toy", seed=1, num_classes=2, theta0="-", out_dir=str(tmp_path / name),
                     data=DataSpec("none", "-"), recipe=Recipe(**r))


def test_a_run_logs_checkpoints_and_writes_its_result_last(tmp_path):
    spec = _spec(tmp_path, "a")
    tracker, task = Recorder(), Toy(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(spec, task, tracker, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert task.closed and not (tmp_path / "a" / CHECKPOINT).exists()
    assert json.loads((tmp_path / "a" / RESULT).read_text()) == result
    assert [step for step, _ in tracker.calls] == [2, 4, 6, 7, 7]  # every 2, the last, eval
    step2 = tracker.calls[0][1]
    assert set(step2) == {"train/mse", "train/half", "train/lr"} and step2["train/half"] == 0.5
    assert tracker.calls[-1][1] == {}  # the toy result has no measurement, only ...
    assert tracker.params == {"result.iterations": 7, "result.train_seconds": 0.0,  # params
                              "result.threads": 1}  # the threads it computed on
    assert result["threads"] == 1
    assert checkpoint_every(spec.recipe) == 3
    assert checkpoint_every(replace(spec.recipe, checkpoint_every=0, iterations=45)) == 4


def test_an_interrupted_run_resumes_to_the_same_end(tmp_path):
    reference = run(_spec(tmp_path, "ref"), Toy(_spec(tmp_path, "ref")), progress=False)
    spec = _spec(tmp_path, "killed")
    task = Toy(spec, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        run(spec, task, progress=False)
    assert task.closed and not (tmp_path / "killed" / RESULT).exists()
    assert load_file(tmp_path / "killed" / CHECKPOINT)["step"] == 3
    changed = _spec(tmp_path, "killed", lr=0.1)
    with pytest.raises(KcdError, match="belongs to another version of this run"):
        run(changed, Toy(changed), progress=False)
    runtime_only = _spec(tmp_path, "killed", log_every=1, checkpoint_every=2)
    assert run(runtime_only, Toy(runtime_only), progress=False)["w"] == reference["w"]


def test_a_non_finite_loss_stops_the_run_before_its_next_checkpoint(tmp_path):
    """The loop reads the guard back at logging steps and before each checkpoint: the run stops
    at the first of them after the bad step, naming the term and the iteration, and no
    checkpoint or result holds the bad weights."""
    spec = _spec(tmp_path, "nan", checkpoint_every=3)  # steps 3 and 6 would checkpoint
    with pytest.raises(KcdError, match=r"loss term 'mse' is (inf|nan) at iteration 2; lower "
                                       r"the learning rate or the weight"):
        run(spec, Toy(spec, nan_at=2), progress=False)
    assert not (tmp_path / "nan" / CHECKPOINT).exists()
    assert not (tmp_path / "nan" / RESULT).exists()


def test_the_finite_guard_reports_the_first_bad_step_and_term_without_syncing_each_step():
    from kcd.run import FiniteGuard

    guard = FiniteGuard("the weight")
    syncs = []
    real_int, real_tolist = torch.Tensor.__int__, torch.Tensor.tolist

    def counting(fn):
        def wrapped(self, *a, **k):
            syncs.append(fn.__name__)
            return fn(self, *a, **k)
        return wrapped

    torch.Tensor.__int__, torch.Tensor.tolist = counting(real_int), counting(real_tolist)
    try:
        for it in range(6):
            bad = float("nan") if it in (3, 4) else 1.0
            total = guard.total({"ce": torch.tensor(1.0), "kd": torch.tensor(bad)}, it)
            assert total.dim() == 0
        assert syncs == []  # nothing read back while stepping
        with pytest.raises(KcdError, match=r"loss term 'kd' is nan at iteration 3; lower the "
                                           r"learning rate or the weight"):
            guard.check()
    finally:
        torch.Tensor.__int__, torch.Tensor.tolist = real_int, real_tolist
    assert FiniteGuard("x").check() is None  # nothing recorded: nothing to report


def test_a_step_reads_nothing_back_between_logging_steps(tmp_path, monkeypatch):
    """The classification step of a real distillation: between the loop's logging steps no
    tensor is read back to the host (.item(), float(), bool(), int(), .tolist(), .cpu())."""
    from kcd.data.demo import DemoSizes, write_demo_data
    from kcd.specs import DistillSpec
    from kcd.train import _Classification, init_weights

    write_demo_data(tmp_path / "demo", kinds=("cifar100",), sizes=DemoSizes.tiny(),
                    progress=False)
    init_weights("resnet20", 0, 100, tmp_path / "t.pt")
    init_weights("resnet20", 1, 100, tmp_path / "s.pt")
    data = DataSpec("cifar100", str(tmp_path / "demo"))
    spec = TrainSpec(arch="resnet20", seed=0, num_classes=100, theta0=str(tmp_path / "s.pt"),
                     out_dir=str(tmp_path / "run"), data=data,
                     recipe=Recipe(iterations=4, batch_size=8, lr=0.01, log_every=100),
                     distill=DistillSpec(method="fitnets", teacher="resnet20",
                                         teacher_weights=str(tmp_path / "t.pt")))
    task = _Classification(spec, progress=False)
    task.step(0)  # the first step builds what it keeps (taps, optimizers)
    reads = []
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counting)
    for step in (1, 2, 3):
        task.step(step)
    monkeypatch.undo()
    task.close()
    assert reads == []
