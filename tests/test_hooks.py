"""The training hooks of a distillation loss (stages, before/after each step, the iteration in
the batch) and the dynamic transform: each method's schedule lives with the method, and a new
method with a schedule of its own trains without any change to the training loop."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kcd.checkpoint import load_file
from kcd.errors import KcdError
from kcd.losses import LOSSES, MethodSpec, build_loss
from kcd.losses.base import DistillationLoss, DistillBatch, DistillContext, Stage, softened_kl
from kcd.specs import DistillSpec, Recipe
from kcd.transforms import ChannelTransform, DynamicMatching

RECIPE = Recipe(iterations=10, batch_size=4, lr=0.1, momentum=0.8, weight_decay=1e-3,
                nesterov=True)


class Loads:
    """A :class:`DistillContext` whose teacher loads are recorded instead of performed."""

    def __init__(self, spec: DistillSpec, recipe: Recipe = RECIPE) -> None:
        self.calls: list[tuple[str, str]] = []
        self.context = DistillContext(spec, recipe, lambda path, what: self.calls.append(
            (path, what)))


# --------------------------------------------------------------------------- the defaults


def test_a_plain_loss_has_the_main_stage_alone_and_refuses_settings_it_would_ignore():
    loss = build_loss("kd", [], [])
    run = Loads(DistillSpec(method="kd")).context
    loss.setup(run)
    (stage,) = loss.stages(run)
    assert (stage.name, stage.iterations, stage.cross_entropy, stage.main) == ("main", 10, True,
                                                                              True)
    assert stage.terms is loss
    loss.before_step(0, run)  # no-ops
    loss.after_step(0, run)
    with pytest.raises(KcdError, match="init_iterations is only for methods with an "
                                       "initialisation stage, not 'kd'"):
        loss.setup(Loads(DistillSpec(method="kd", init_iterations=3)).context)
    with pytest.raises(KcdError, match="anchors is only for methods with a route of teacher "
                                       "anchors, not 'fitnets'"):
        build_loss("fitnets", [3], [6]).setup(Loads(DistillSpec(method="fitnets",
                                                                 anchors=["a.pt"])).context)


def test_ab_puts_its_initialisation_stage_with_its_own_optimizer_first():
    loss = build_loss("ab", [3], [6])
    run = Loads(DistillSpec(method="ab", init_iterations=4)).context
    loss.setup(run)
    init, main = loss.stages(run)
    assert (init.name, init.iterations, init.cross_entropy, init.main) == ("init", 4, False, False)
    assert (main.iterations, main.cross_entropy, main.main) == (10, True, True)
    assert init.terms == loss.initialization_loss
    opt = init.optimizer(list(loss.parameters()))
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        0.1, 0.8, 1e-3, False)
    without = Loads(DistillSpec(method="ab")).context
    assert [s.name for s in loss.stages(without)] == ["main"]
    with pytest.raises(KcdError, match="anchors is only for methods with a route"):
        loss.setup(Loads(DistillSpec(method="ab", anchors=["a.pt"])).context)
    with pytest.raises(KcdError, match="init_iterations must be an integer >= 0"):
        loss.setup(Loads(DistillSpec(method="ab", init_iterations=-1)).context)


def test_rco_loads_the_anchor_of_the_route_when_it_changes(tmp_path):
    anchors = []
    for i in range(3):
        anchors.append(str(tmp_path / f"a{i}.pt"))
        Path(anchors[-1]).write_bytes(b"")
    loss = build_loss("rco", [3], [6])
    loads = Loads(DistillSpec(method="rco", anchors=anchors))
    loss.setup(loads.context)
    for it in range(10):
        loss.before_step(it, loads.context)
    # 3 anchors over 10 iterations: iterations 0-3, 4-6 and 7-9
    assert loads.calls == [(anchors[0], "RCO anchor"), (anchors[1], "RCO anchor"),
                           (anchors[2], "RCO anchor")]
    resumed = build_loss("rco", [3], [6])
    loads.calls.clear()
    resumed.setup(loads.context)
    resumed.before_step(5, loads.context)  # a resumed run's fresh teacher loads its anchor
    resumed.before_step(6, loads.context)
    assert loads.calls == [(anchors[1], "RCO anchor")]

    plain = Loads(DistillSpec(method="rco"))  # no anchors: the final teacher throughout
    loss.setup(plain.context)
    loss.before_step(0, plain.context)
    assert plain.calls == []
    with pytest.raises(KcdError, match=r"RCO anchor .*missing.pt does not exist"):
        loss.setup(Loads(DistillSpec(method="rco", anchors=[str(tmp_path / "missing.pt")])).context)
    with pytest.raises(KcdError, match="init_iterations is only for methods with an "
                                       "initialisation stage, not 'rco'"):
        loss.setup(Loads(DistillSpec(method="rco", init_iterations=2)).context)


# --------------------------------------------------------------------------- dynamic transform


def test_dynamic_matching_rematches_every_e_iterations_from_what_it_saw():
    torch.manual_seed(0)
    perm = torch.tensor([2, 0, 3, 1])
    transform = ChannelTransform(torch.arange(4), 4)
    dynamic = DynamicMatching(transform, every=2, metric="correlation", strategy="bipartite")
    teacher = torch.randn(64, 4, 3, 3)
    student = teacher[:, perm] + 0.01 * torch.randn(64, 4, 3, 3)  # student j ~ teacher perm[j]
    dynamic.observe(teacher[:32], student[:32])
    dynamic.after_step(0)  # not the end of a period
    assert torch.equal(transform.index, torch.arange(4)) and dynamic.stats.n == 32
    state = dynamic.state_dict()
    resumed = DynamicMatching(ChannelTransform(torch.arange(4), 4), every=2)
    resumed.load_state_dict(state)
    for d in (dynamic, resumed):
        d.observe(teacher[32:], student[32:])
        d.after_step(1)
        assert torch.equal(d.transform.index, perm) and d.stats.n == 0
    dynamic.after_step(3)  # nothing recorded since: the map stays
    assert torch.equal(transform.index, perm)
    with pytest.raises(KcdError, match="needs a channel transform file per pair"):
        DynamicMatching(None, every=2)


# --------------------------------------------------------------------------- a new method


SEEN: dict[str, list] = {}


class WarmUpKD(DistillationLoss):
    """A method the training loop has never heard of: a stage of its own (KD alone, with a
    plain SGD at a tenth of the learning rate), then KD whose weight warms up linearly over
    ``warmup`` main iterations. It records what the loop showed it."""

    method = "warm_kd"
    uses_logits = True
    uses_features = False

    def __init__(self, weight, student_channels, teacher_channels, transforms=None, *,
                 warmup: int = 3) -> None:
        super().__init__(weight, student_channels, teacher_channels, transforms)
        self.warmup = warmup

    def terms(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        SEEN["batches"].append(batch.iteration)
        ramp = min(1.0, (batch.iteration + 1) / self.warmup)
        kl = softened_kl(batch.student_logits, batch.teacher_logits, 4.0)
        return {"warm_kd": self.weight * ramp * kl}

    def alone(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        SEEN["batches"].append(batch.iteration)
        self.validate(batch)
        return {"warm_kd_alone": softened_kl(batch.student_logits, batch.teacher_logits, 4.0)}

    def setup(self, run: DistillContext) -> None:
        super().setup(run)
        SEEN["setup"].append(run.recipe.iterations)

    def stages(self, run: DistillContext) -> list[Stage]:
        lr = run.recipe.lr / 10
        alone = Stage("alone", 2, self.alone, cross_entropy=False,
                      optimizer=lambda params: torch.optim.SGD(params, lr=lr))
        return [alone, *super().stages(run)]

    def before_step(self, iteration: int, run: DistillContext) -> None:
        SEEN["before"].append(iteration)

    def after_step(self, iteration: int, run: DistillContext) -> None:
        SEEN["after"].append(iteration)


class Recorder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.fail_at = fail_at

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.metrics[step] = metrics


def test_a_new_method_with_its_own_stage_and_warm_up_needs_no_change_to_train(
        demo_root, tmp_path, monkeypatch):
    from kcd.config import train_spec
    from kcd.train import CHECKPOINT, FINAL, RESULT, init_weights, train
    from tests.conftest import tiny_config

    monkeypatch.setitem(LOSSES._items, "warm_kd", MethodSpec(
        "warm_kd", f"{__name__}:WarmUpKD", 4.0, "KD with a warm-up (test)", ("warmup",),
        label="WarmKD", features=False))
    cfg = tiny_config(demo_root, tmp_path / "results", log_every=1, checkpoint_every=2)
    init_weights("resnet20_0.5x", 0, 100, tmp_path / "student.pt")
    init_weights("resnet20", 1, 100, tmp_path / "teacher.pt")
    kd = train_spec(cfg, dataset="cifar100", arch="resnet20_0.5x", seed=0,
                    theta0=str(tmp_path / "student.pt"), out_dir=str(tmp_path / "warm"),
                    method="kd", teacher="resnet20", teacher_weights=str(tmp_path / "teacher.pt"))
    spec = replace(kd, distill=replace(kd.distill, method="warm_kd", weight=None, options={}))

    SEEN.update(batches=[], before=[], after=[], setup=[])
    tracker = Recorder()
    result = train(spec, tracker=tracker, progress=False)
    assert SEEN["setup"] == [6]
    assert SEEN["batches"] == [-2, -1, 0, 1, 2, 3, 4, 5]  # its stage, then the main stage
    assert SEEN["before"] == SEEN["after"] == [0, 1, 2, 3, 4, 5]
    assert set(tracker.metrics) == set(range(1, 9))
    assert set(tracker.metrics[2]) == {"train/warm_kd_alone", "train/lr"}  # no cross-entropy
    assert tracker.metrics[2]["train/lr"] == pytest.approx(0.005)  # its own optimizer
    assert set(tracker.metrics[3]) == {"train/ce", "train/warm_kd", "train/lr"}
    assert result["iterations"] == 6 and (tmp_path / "warm" / RESULT).exists()

    # interrupted after its own stage, resumed: the weights of the uninterrupted run
    killed = replace(spec, out_dir=str(tmp_path / "killed"))
    SEEN.update(batches=[], before=[], after=[], setup=[])
    with pytest.raises(KeyboardInterrupt):
        train(killed, tracker=Recorder(fail_at=3), progress=False)
    checkpoint = load_file(tmp_path / "killed" / CHECKPOINT)
    assert checkpoint["step"] == 2 and set(checkpoint["stage_optimizers"]) == {"alone"}
    train(killed, progress=False)
    a = load_file(tmp_path / "warm" / FINAL)["state_dict"]
    b = load_file(tmp_path / "killed" / FINAL)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "killed" / RESULT).read_text())
    assert saved["top1"] == result["top1"] and saved["teacher_kl"] == result["teacher_kl"]
