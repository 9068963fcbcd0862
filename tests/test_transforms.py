"""Matching strategies and transform modules."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import yaml

from kcd.consistency import (
    METRICS,
    ConsistencyStatistics,
    consistency_matrix,
    diagonal_consistency,
    gamma,
)
from kcd.errors import KcdError
from kcd.transforms import (
    STRATEGIES,
    ChannelTransform,
    LearnedTransform,
    PerClassTransform,
    build_transform,
    fit_learned_transform,
    label_groups,
    load_transform,
    match,
    save_transform,
)


def brute_force_best(m: torch.Tensor) -> float:
    """Best Γ over all maps that use each teacher channel at most once."""
    c_t, c_s = m.shape
    return max(gamma(m, list(p)) for p in itertools.permutations(range(c_t), c_s))


# ---- matching ----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_bipartite_recovers_planted_permutation(metric):
    # The teacher is a channel-permuted noisy copy of the student:
    # teacher[:, i] ≈ student[:, perm[i]].
    # kl works too: a softmax over samples keeps distinct random channels far apart.
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    perm = torch.randperm(8, generator=generator)
    noise = torch.randn(200, 8, generator=generator, dtype=torch.float64)
    teacher = student[:, perm] + 0.05 * noise
    expected = torch.argsort(perm)  # student channel j is found in teacher channel expected[j]
    assert torch.equal(match(consistency_matrix(teacher, student, metric), "bipartite"), expected)
    stats = ConsistencyStatistics(8, 8, [metric])
    for start in range(0, 200, 64):
        stats.update(teacher[start:start + 64], student[start:start + 64])
    assert torch.equal(match(stats.matrix(metric), "bipartite"), expected)


@pytest.mark.parametrize("seed", range(5))
def test_bipartite_is_optimal_and_ranks_between_the_others(seed):
    m = torch.rand(6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bipartite = gamma(m, match(m, "bipartite"))
    assert bipartite == pytest.approx(brute_force_best(m), abs=1e-12)
    assert bipartite >= gamma(m, match(m, "identity"))
    assert bipartite >= gamma(m, match(m, "random", seed=seed))
    assert gamma(m, match(m, "greedy")) >= bipartite


def test_bipartite_rectangular_selects_distinct_teacher_channels_optimally():
    m = torch.rand(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    channel_map = match(m, "bipartite")
    assert channel_map.shape == (3,) and len(set(channel_map.tolist())) == 3
    assert gamma(m, channel_map) == pytest.approx(brute_force_best(m), abs=1e-12)


def test_more_student_than_teacher_channels_reuses_each_teacher_channel_boundedly():
    m = torch.rand(2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    limit = math.ceil(5 / 2)
    best = max(
        gamma(m, list(p)) for p in itertools.product(range(2), repeat=5)
        if max(p.count(i) for i in range(2)) <= limit
    )
    for strategy in ("bipartite", "random"):
        channel_map = match(m, strategy, seed=3)
        assert max(channel_map.tolist().count(i) for i in range(2)) <= limit
    assert gamma(m, match(m, "bipartite")) == pytest.approx(best, abs=1e-12)


def test_greedy_takes_the_column_argmax_and_may_repeat():
    m = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.7, 0.3], [0.1, 0.1, 0.2]], dtype=torch.float64)
    assert match(m, "greedy").tolist() == [0, 0, 1]


def test_random_is_seeded_and_distinct():
    m = torch.zeros(10, 6)
    first, again, other = (match(m, "random", seed=s) for s in (7, 7, 8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(set(first.tolist())) == 6 and first.max() < 10


def test_identity_is_arange():
    assert match(torch.rand(4, 4), "identity").tolist() == [0, 1, 2, 3]


# ---- transforms --------------------------------------------------------------------------


def test_channel_transform_applies_the_map():
    m = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    transform = build_transform(m, "bipartite", meta={"teacher": "t", "student": "s", "layer": "3"})
    x = torch.randn(2, 6, 3, 3)
    out = transform(x)
    assert out.shape == (2, 4, 3, 3)
    for j, i in enumerate(transform.index.tolist()):
        assert torch.equal(out[:, j], x[:, i])
    assert torch.equal(transform(x.mean((2, 3))), out.mean((2, 3)))
    assert transform.meta["strategy"] == "bipartite" and transform.meta["gamma_before"] is None
    assert transform.meta["gamma_after"] == pytest.approx(gamma(m, transform.index))


def test_build_transform_records_gamma_before_on_square_matrices():
    m = torch.rand(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    transform = build_transform(m, "greedy")
    assert transform.meta["gamma_before"] == pytest.approx(float(m.trace()))
    assert transform.meta["gamma_after"] >= transform.meta["gamma_before"]


def _per_class() -> PerClassTransform:
    return PerClassTransform(
        [ChannelTransform(torch.tensor([0, 1]), 3), ChannelTransform(torch.tensor([2, 2]), 3)],
        num_classes=4, meta={"k": 2},
    )


def test_per_class_transform_routes_samples_by_label():
    x = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    labels = torch.tensor([0, 3, 1, 2, 0])  # groups 0, 1, 0, 1, 0
    out = _per_class()(x, labels)
    for row, group in enumerate([0, 1, 0, 1, 0]):
        assert out[row].tolist() == (x[row, [0, 1]] if group == 0 else x[row, [2, 2]]).tolist()


def test_label_groups_are_equal_label_ranges():
    labels = torch.tensor([0, 9, 10, 19, 999])
    assert label_groups(labels, 100, 1000).tolist() == [0, 0, 1, 1, 99]
    assert label_groups(labels, 1, 1000).tolist() == [0] * 5


@pytest.mark.parametrize("kind", ["subnet-fc", "subnet-res"])
def test_learned_transform_shapes(kind):
    transform = LearnedTransform(kind, 6, 4).eval()
    assert transform(torch.randn(2, 6, 5, 5)).shape == (2, 4, 5, 5)
    assert transform(torch.randn(2, 6)).shape == (2, 4)


def _planted_linear_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 3, generator=generator)
    batches = []
    for _ in range(4):
        teacher = torch.randn(32, 4, 2, 2, generator=generator)
        student = torch.einsum("bchw,cd->bdhw", teacher, mixing)
        batches.append((teacher, student + 0.05 * torch.randn(student.shape, generator=generator)))
    return batches


def test_fit_subnet_fc_improves_consistency_and_is_deterministic():
    pairs = _planted_linear_pairs()
    fitted = fit_learned_transform("subnet-fc", pairs, "correlation", steps=60, lr=0.05, seed=0)
    assert not fitted.training and not any(p.requires_grad for p in fitted.parameters())
    assert fitted.meta["gamma_after"] > fitted.meta["gamma_init"] + 0.5
    assert fitted.meta["gamma_after"] > 0.95 * 3  # three student channels, correlation near 1
    teacher, student = pairs[0]
    score = diagonal_consistency(fitted(teacher).mean((2, 3)), student.mean((2, 3)), "correlation")
    assert float(score.sum()) == pytest.approx(fitted.meta["gamma_after"])
    again = fit_learned_transform("subnet-fc", lambda: iter(pairs), steps=60, lr=0.05, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(fitted.parameters(), again.parameters()))


def test_fit_subnet_res_runs():
    pairs = _planted_linear_pairs()
    fitted = fit_learned_transform("subnet-res", pairs, steps=3, meta={"layer": "x"})
    assert fitted.meta["strategy"] == "subnet-res" and fitted.meta["layer"] == "x"
    assert fitted.meta["gamma_before"] is None  # c_T != c_S
    # on a CPU its convolutions (two 3x3, the 1x1 shortcut) take kcd.models.small_conv; the
    # saved state is the same
    assert sum(type(m).__name__ == "SmallConv2d" for m in fitted.modules()) == 3
    assert all(k.startswith(("shortcut.", "branch.")) for k in fitted.state_dict())


def test_fit_stops_clearly_when_pairs_run_out():
    pairs = iter(_planted_linear_pairs())
    with pytest.raises(KcdError, match="pairs ran out after 4 batches"):
        fit_learned_transform("subnet-fc", pairs, steps=10)


# ---- saving ------------------------------------------------------------------------------


def _roundtrip(transform, tmp_path):
    path = tmp_path / "transform.pt"
    save_transform(transform, path)
    assert isinstance(torch.load(path, weights_only=True), dict)
    loaded = load_transform(path)
    assert type(loaded) is type(transform) and loaded.meta == transform.meta
    assert (loaded.c_t, loaded.c_s) == (transform.c_t, transform.c_s)
    return loaded


def test_save_load_channel_transform(tmp_path):
    transform = build_transform(torch.rand(4, 4), "bipartite", meta={"teacher": "resnet56"})
    loaded = _roundtrip(transform, tmp_path)
    assert torch.equal(loaded.index, transform.index)


@pytest.mark.parametrize("kind", ["subnet-fc", "subnet-res"])
def test_save_load_learned_transform(kind, tmp_path):
    transform = fit_learned_transform(kind, _planted_linear_pairs(), steps=2, meta={"note": None})
    loaded = _roundtrip(transform, tmp_path)
    x = torch.randn(3, 4, 2, 2)
    with torch.no_grad():  # as the transform is used: on the teacher's features, no gradients
        assert torch.equal(loaded(x), transform(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_save_load_per_class_transform(tmp_path):
    mixed = PerClassTransform([ChannelTransform(torch.tensor([1, 0, 2]), 3),
                               LearnedTransform("subnet-fc", 3, 3).eval()], num_classes=10)
    loaded = _roundtrip(mixed, tmp_path)
    x, labels = torch.randn(6, 3), torch.tensor([0, 9, 4, 5, 1, 8])
    assert torch.equal(loaded(x, labels), mixed(x, labels))


def test_load_rejects_files_that_are_not_transforms(tmp_path):
    stats = tmp_path / "stats.pt"
    ConsistencyStatistics(2, 2, ["l2"]).save(stats)
    with pytest.raises(KcdError, match="stats.pt is not a kcd.transform file"):
        load_transform(stats)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(KcdError, match="notes.txt is unreadable or truncated"):
        load_transform(text)


def test_save_rejects_meta_that_would_not_load():
    transform = ChannelTransform(torch.tensor([0]), 1, meta={"m": torch.zeros(2)})
    with pytest.raises(KcdError, match="meta 'm' is a Tensor"):
        save_transform(transform, "unused.pt")


# ---- bad input ---------------------------------------------------------------------------


def test_unknown_strategy_lists_accepted_values():
    names = ["identity", "random", "greedy", "bipartite", "subnet-fc", "subnet-res"]
    expected = f"unknown matching strategy 'hungarian'; known: {', '.join(names)}"
    with pytest.raises(KcdError, match=expected):
        match(torch.rand(3, 3), "hungarian")
    assert STRATEGIES.names() == names


def test_identity_needs_square_matrix():
    with pytest.raises(KcdError, match="identity needs equal channel counts, got c_T=4 c_S=3; "
                                       "use bipartite or greedy"):
        match(torch.rand(4, 3), "identity")


@pytest.mark.parametrize("kind", ["subnet-fc", "subnet-res"])
def test_learned_strategy_in_match_points_to_fit(kind):
    with pytest.raises(KcdError, match=f"use fit_learned_transform\\('{kind}'"):
        match(torch.rand(3, 3), kind)


def test_nan_in_matrix():
    m = torch.rand(3, 3)
    m[1, 2] = float("nan")
    with pytest.raises(KcdError, match="consistency matrix contains NaN"):
        match(m, "bipartite")


def test_transform_on_wrong_channel_count():
    transforms = (ChannelTransform(torch.tensor([2, 0, 1]), 3), LearnedTransform("subnet-fc", 3, 2),
                  _per_class())
    for transform in transforms:
        with pytest.raises(KcdError, match="transform expects c_T=3 teacher channels, got 5"):
            transform(torch.randn(2, 5, 4, 4), torch.zeros(2, dtype=torch.long))


def test_per_class_needs_labels_and_at_most_one_group_per_class():
    with pytest.raises(KcdError, match="needs the batch's class labels"):
        _per_class()(torch.randn(2, 3))
    with pytest.raises(KcdError, match="K=5 transforms for num_classes=4; K must be between 1"):
        PerClassTransform([ChannelTransform(torch.tensor([0]), 1)] * 5, num_classes=4)
    with pytest.raises(KcdError, match="K=11 transforms for num_classes=10"):
        label_groups(torch.tensor([0]), 11, 10)
    with pytest.raises(KcdError, match=r"labels must lie in 0..3"):
        _per_class()(torch.randn(2, 3), torch.tensor([0, 4]))


@pytest.mark.parametrize("how", ["flags", "spec"])
def test_kcd_transform_passes_lr_and_batch_size_to_learned_strategies(how, monkeypatch,
                                                                     demo_root, tmp_path):
    """Both the flag path and the workflow's --spec path hand --lr and --batch-size on."""
    import json

    import kcd.statistics
    from kcd.cli import main
    from tests.conftest import tiny_config

    seen = {}
    monkeypatch.setattr(kcd.statistics, "learn_transform",
                        lambda **kw: seen.update(kw) or {"gamma_after": 0.0})
    out = str(tmp_path / "t.pt")
    args = ["transform", "--strategy", "subnet-fc", "--out", out, "--lr", "0.25",
            "--batch-size", "7", "--steps", "3", "-q"]
    if how == "flags":
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump(tiny_config(demo_root, tmp_path / "results")))
        args += ["--config", str(cfg), "--dataset", "cifar100", "--teacher", "resnet20",
                 "--teacher-weights", "t.pt", "--student", "resnet20_0.5x",
                 "--student-weights", "s.pt"]
    else:
        spec = {"teacher": "resnet20", "teacher_weights": "t.pt", "student": "resnet20_0.5x",
                "student_weights": "s.pt", "layers": ["layer3", "layer3"],
                "data": {"name": "cifar100", "root": str(demo_root)}, "num_classes": 100,
                "out": out}
        args += ["--spec", json.dumps(spec)]
    assert main(args) == 0
    assert (seen["lr"], seen["batch_size"], seen["steps"]) == (0.25, 7, 3)
