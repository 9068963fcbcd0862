"""Distillation losses: each against an independent, loop-by-loop computation of its formula."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from kcd.errors import KcdError
from kcd.losses.rkd import angles
from kcd.losses import (
    LOSSES,
    ABLoss,
    AnchorSchedule,
    DistillBatch,
    build_loss,
)

B, CLASSES = 5, 7


class Permute(nn.Module):
    """A fixed channel selection: output channel i is teacher channel ``index[i]``."""

    def __init__(self, index: list[int], c_t: int) -> None:
        super().__init__()
        self.c_t, self.c_s = c_t, len(index)
        self.register_buffer("index", torch.tensor(index))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return x[:, self.index]


class PerClass(nn.Module):
    """A channel permutation chosen by each sample's label."""

    def __init__(self, indices: list[list[int]]) -> None:
        super().__init__()
        self.c_t = self.c_s = len(indices[0])
        self.register_buffer("indices", torch.tensor(indices))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        assert labels is not None
        return torch.stack([x[b, self.indices[labels[b]]] for b in range(len(x))])


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def batch(s_feats=(), t_feats=(), *, teacher_logits=True, seed=0) -> DistillBatch:
    return DistillBatch(
        labels=torch.arange(B) % 3,
        student_logits=rand(B, CLASSES, seed=seed + 100),
        teacher_logits=rand(B, CLASSES, seed=seed + 200) * 2 if teacher_logits else None,
        student_features=list(s_feats),
        teacher_features=list(t_feats),
    )


def np_(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().astype(np.float64)


def manual_softened_kl(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    total = 0.0
    for row_s, row_t in zip(s, t):
        p_t = np.exp(row_t / temperature) / np.exp(row_t / temperature).sum()
        p_s = np.exp(row_s / temperature) / np.exp(row_s / temperature).sum()
        total += sum(pt * (np.log(pt) - np.log(ps)) for pt, ps in zip(p_t, p_s))
    return total / len(s)


def manual_conv_bn(block: nn.Sequential, x: torch.Tensor) -> np.ndarray:
    """1x1 convolution then batch norm in training mode (batch statistics), by hand."""
    conv, bn = block
    w = np_(conv.weight)[:, :, 0, 0]
    y = np.einsum("oc,bchw->bohw", w, np_(x))
    mean = y.mean(axis=(0, 2, 3), keepdims=True)
    var = y.var(axis=(0, 2, 3), keepdims=True)
    gamma = np_(bn.weight).reshape(1, -1, 1, 1)
    beta = np_(bn.bias).reshape(1, -1, 1, 1)
    return (y - mean) / np.sqrt(var + bn.eps) * gamma + beta


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a - b) ** 2).mean())


def smooth_l1(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b).ravel()
    return float(np.mean([0.5 * x * x if x < 1 else x - 0.5 for x in d]))


# --- formulas -----------------------------------------------------------------------------


@pytest.mark.parametrize("t_squared", [False, True])
def test_kd_matches_softened_kl(t_squared):
    b = batch()
    loss = build_loss("kd", [], [], t_squared=t_squared)
    expected = 16 * manual_softened_kl(np_(b.student_logits), np_(b.teacher_logits), 4.0)
    expected *= 16 if t_squared else 1
    assert set(loss(b)) == {"kd"}
    assert loss(b)["kd"].item() == pytest.approx(expected, rel=1e-9)


def test_fitnets_uses_regressor_then_mse_summed_over_pairs():
    s = [rand(B, 3, 4, 4, seed=1), rand(B, 2, 2, 2, seed=2)]
    t = [rand(B, 6, 4, 4, seed=3), rand(B, 5, 2, 2, seed=4)]
    loss = build_loss("fitnets", [3, 2], [6, 5]).double()
    expected = 100 * sum(
        mse(manual_conv_bn(r, x), np_(y)) for r, x, y in zip(loss.regressors, s, t)
    )
    assert loss(batch(s, t))["fitnets"].item() == pytest.approx(expected, rel=1e-9)


def test_at_matches_normalised_attention_maps():
    s, t = rand(B, 3, 4, 4, seed=1), rand(B, 6, 4, 4, seed=2)
    loss = build_loss("at", [3], [6])
    diffs = []
    for xs, xt in zip(np_(s), np_(t)):
        a_s = (xs**2).mean(axis=0).ravel()
        a_t = (xt**2).mean(axis=0).ravel()
        diffs.extend(a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t))
    expected = 1000 * np.mean(np.square(diffs))
    assert loss(batch([s], [t]))["at"].item() == pytest.approx(expected, rel=1e-9)


def manual_rkd(s: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Distance and angle terms by explicit loops over pairs and triplets of samples."""
    es, et = s.mean(axis=(2, 3)), t.mean(axis=(2, 3))
    n = len(es)

    def distances(e):
        d = np.zeros((n, n))
        for i, j in itertools.product(range(n), repeat=2):
            d[i, j] = np.linalg.norm(e[i] - e[j]) if i != j else 0.0
        off_diagonal = [d[i, j] for i in range(n) for j in range(n) if i != j]
        return d / np.mean(off_diagonal)

    def cosines(e):
        a = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            if j != i and k != i:
                u, v = e[j] - e[i], e[k] - e[i]
                a[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    return smooth_l1(distances(es), distances(et)), smooth_l1(cosines(es), cosines(et))


def test_rkd_distance_and_angle_match_loops():
    s, t = rand(B, 3, 2, 2, seed=1), rand(B, 6, 4, 4, seed=2) * 3
    terms = build_loss("rkd", [3], [6])(batch([s], [t]))
    distance, angle = manual_rkd(np_(s), np_(t))
    assert set(terms) == {"rkd_distance", "rkd_angle"}
    assert terms["rkd_distance"].item() == pytest.approx(10 * 1 * distance, rel=1e-9)
    assert terms["rkd_angle"].item() == pytest.approx(10 * 2 * angle, rel=1e-9)


@pytest.mark.parametrize("channels, offset", [(2048, 0.0), (64, 30.0)])
def test_rkd_angles_in_float32_equal_the_difference_vectors_in_float64(channels, offset):
    """The Gram form (kcd.losses.rkd.angles) against the reference code's b x b x c difference
    vectors: the same angles and the same gradient of RKD's angle term, in float32, also for
    embeddings far from the origin (where a Gram matrix without centring would cancel) and
    for a sample drawn twice (angle 0 there, as in the reference; the reference's gradient on
    the two copies is its normalize's 1/eps, so those rows are only checked to stay of the
    others' size)."""
    torch.manual_seed(0)
    es = torch.randn(16, channels) + offset
    es[9] = es[2]  # a sample drawn twice: no direction between the two, as for j == i
    es.requires_grad_()
    et = torch.randn(16, channels) * 3
    et[4] = et[11]

    def reference(e):
        directions = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
        return directions @ directions.transpose(1, 2)

    exact = es.detach().double().requires_grad_()
    expected = torch.nn.functional.smooth_l1_loss(reference(exact), reference(et.double()))
    (expected_grad,) = torch.autograd.grad(expected, exact)
    got = torch.nn.functional.smooth_l1_loss(angles(es), angles(et))
    (grad,) = torch.autograd.grad(got, es)
    assert got.dtype == torch.float32
    torch.testing.assert_close(angles(es.detach()).double(), reference(exact.detach()),
                               rtol=0, atol=1e-6)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    rest = [i for i in range(16) if i not in (2, 9)]
    torch.testing.assert_close(grad[rest].double(), expected_grad[rest], rtol=1e-4,
                               atol=1e-5 * expected_grad[rest].abs().max().item())
    assert grad.isfinite().all()
    assert grad[[2, 9]].abs().max() < 10 * grad[rest].abs().max()


def test_rkd_angles_keep_a_close_but_distinct_sample():
    """Only a repeated sample loses its directions: one 1e-3 of the norm away keeps them."""
    torch.manual_seed(1)
    e = torch.randn(8, 256, dtype=torch.float64)
    e[5] = e[1] + 1e-3 * torch.randn(256, dtype=torch.float64) * e[1].norm() / 16
    directions = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
    reference = directions @ directions.transpose(1, 2)
    got = angles(e)
    assert got[1, 5, 5] == pytest.approx(1.0) and got[5, 1, 1] == pytest.approx(1.0)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-9)


def test_rkd_with_transform_adds_kcd_l2_term():
    s, t = rand(B, 3, 2, 2, seed=1), rand(B, 6, 2, 2, seed=2)
    perm = Permute([4, 0, 2], c_t=6)
    terms = build_loss("rkd", [3], [6], transforms=[perm])(batch([s], [t]))
    t_view = np_(t)[:, [4, 0, 2]]
    # RKD's own relations see the original teacher (all 6 channels), as RKD alone does;
    # only the added L2 term ("another loss ... on transformed feature maps") sees T(F^T)
    distance, angle = manual_rkd(np_(s), np_(t))
    assert terms["rkd_distance"].item() == pytest.approx(10 * distance, rel=1e-9)
    assert terms["rkd_angle"].item() == pytest.approx(20 * angle, rel=1e-9)
    assert terms["rkd_kcd_l2"].item() == pytest.approx(100 * mse(np_(s), t_view), rel=1e-9)
    plain = build_loss("rkd", [3], [6])(batch([s], [t]))
    assert terms["rkd_distance"].item() == pytest.approx(plain["rkd_distance"].item(), rel=1e-12)
    assert terms["rkd_angle"].item() == pytest.approx(plain["rkd_angle"].item(), rel=1e-12)
    subset_distance, _ = manual_rkd(np_(s), t_view)
    assert subset_distance != pytest.approx(distance, rel=1e-3)  # the subset would differ


def manual_ab(c: np.ndarray, t: np.ndarray, m: float) -> float:
    below = (c > -m) & (t <= 0)
    above = (c <= m) & (t > 0)
    per_element = np.where(below, (c + m) ** 2, 0.0) + np.where(above, (c - m) ** 2, 0.0)
    return float(per_element.sum()) / (len(c) * 1000)


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_margin_loss_matches_masks(margin):
    s, t = rand(B, 3, 4, 4, seed=1), rand(B, 6, 4, 4, seed=2)
    loss = build_loss("ab", [3], [6], margin=margin).double()
    expected = manual_ab(manual_conv_bn(loss.connectors[0], s), np_(t), margin)
    b = batch([s], [t])
    assert loss(b)["ab"].item() == pytest.approx(10 * expected, rel=1e-9)
    assert loss.initialization_loss(b)["ab_init"].item() == pytest.approx(expected, rel=1e-9)


def test_ab_after_its_initialisation_stage_is_an_option():
    s, t = rand(B, 3, 4, 4, seed=1), rand(B, 6, 4, 4, seed=2)
    b = batch([s], [t])
    kept = build_loss("ab", [3], [6]).double()
    assert kept.throughout and set(kept(b)) == {"ab"}  # default: the weighted term stays
    init_only = build_loss("ab", [3], [6], throughout=False).double()
    assert init_only(b) == {}  # the AB authors' code: AB in the initialisation stage only
    assert init_only.initialization_loss(b)["ab_init"].item() > 0


def test_l2_is_weighted_mse_summed_over_pairs():
    s = [rand(B, 3, 4, 4, seed=1), rand(B, 2, 2, 2, seed=2)]
    t = [rand(B, 3, 4, 4, seed=3), rand(B, 2, 2, 2, seed=4)]
    expected = 100 * (mse(np_(s[0]), np_(t[0])) + mse(np_(s[1]), np_(t[1])))
    loss = build_loss("l2", [3, 2], [3, 2])
    assert loss(batch(s, t))["l2"].item() == pytest.approx(expected, rel=1e-9)


def test_rco_hint_and_kd_terms():
    s, t = rand(B, 3, 4, 4, seed=1), rand(B, 6, 4, 4, seed=2)
    loss = build_loss("rco", [3], [6]).double()
    b = batch([s], [t])
    terms = loss(b)
    assert terms["rco_hint"].item() == pytest.approx(
        100 * mse(manual_conv_bn(loss.regressors[0], s), np_(t)), rel=1e-9
    )
    assert terms["rco_kd"].item() == pytest.approx(
        16 * manual_softened_kl(np_(b.student_logits), np_(b.teacher_logits), 4.0), rel=1e-9
    )


@pytest.mark.parametrize("anchors,total", [(4, 100), (3, 10), (1, 5), (5, 3)])
def test_anchor_schedule_equal_spans(anchors, total):
    schedule = AnchorSchedule(anchors, total)
    for it in range(total):
        k = schedule.index(it)
        assert k * total / anchors <= it < (k + 1) * total / anchors
    assert schedule.index(total) == schedule.index(10 * total) == anchors - 1


def test_anchor_schedule_boundaries_step_and_resume():
    schedule = AnchorSchedule(4, 100)
    assert [schedule.index(i) for i in (0, 24, 25, 49, 50, 74, 75, 99)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert schedule.step(0) == (0, True)
    assert schedule.step(1) == (0, False)
    assert schedule.step(25) == (1, True)
    assert schedule.step(26) == (1, False)
    resumed = AnchorSchedule(4, 100)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.step(26) == (1, True)  # a fresh teacher must load the anchor
    with pytest.raises(KcdError, match="differs"):
        AnchorSchedule(5, 100).load_state_dict(schedule.state_dict())
    with pytest.raises(KcdError):
        AnchorSchedule(0, 100)
    with pytest.raises(KcdError):
        schedule.index(-1)


# --- transforms ----------------------------------------------------------------------------


def test_transform_changes_exactly_the_teacher_side():
    s, t = rand(B, 3, 4, 4, seed=1), rand(B, 5, 4, 4, seed=2)
    loss = build_loss("l2", [3], [5], transforms=[Permute([4, 1, 3], c_t=5)])
    b = batch([s], [t])
    assert loss(b)["l2"].item() == pytest.approx(100 * mse(np_(s), np_(t)[:, [4, 1, 3]]), rel=1e-9)
    assert torch.equal(b.student_features[0], s)  # inputs untouched

    teacher = torch.zeros(B, 3, 4, 4, dtype=torch.float64)
    teacher[:, [2, 0, 1]] = s  # a teacher that is the student with channels permuted
    perfect = build_loss("l2", [3], [3], transforms=[Permute([2, 0, 1], c_t=3)])
    assert perfect(batch([s], [teacher]))["l2"].item() == 0.0
    assert build_loss("l2", [3], [3])(batch([s], [teacher]))["l2"].item() > 0


def test_per_class_transform_receives_labels():
    s, t = rand(B, 3, 2, 2, seed=1), rand(B, 3, 2, 2, seed=2)
    indices = [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    b = batch([s], [t])
    expected = np.stack([np_(t)[i, indices[int(label)]] for i, label in enumerate(b.labels)])
    loss = build_loss("l2", [3], [3], transforms=[PerClass(indices)])
    assert loss(b)["l2"].item() == pytest.approx(100 * mse(np_(s), expected), rel=1e-9)


def test_transform_sets_regressor_width_and_stays_frozen():
    sub_net = nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))

    class Learned(nn.Module):
        c_t, c_s = 6, 4

        def __init__(self):
            super().__init__()
            self.net = sub_net

        def forward(self, x, labels=None):
            return self.net(x)

    loss = build_loss("fitnets", [3], [6], transforms=[Learned()]).double().train()
    assert loss.regressors[0][0].out_channels == 4
    assert not sub_net.training and not any(p.requires_grad for p in sub_net.parameters())
    loss(batch([rand(B, 3, 2, 2, seed=1)], [rand(B, 6, 2, 2, seed=2)]))["fitnets"].backward()
    assert all(p.grad is None for p in sub_net.parameters())
    assert all(p.grad is not None for p in loss.regressors.parameters())


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fitnets", "at", "ab", "rkd", "rco", "l2"])
@pytest.mark.parametrize("with_transform", [False, True])
def test_gradients_reach_student_and_trainable_parts_only(name, with_transform):
    s = rand(B, 3, 4, 4, seed=1).requires_grad_()
    t = rand(B, 3, 4, 4, seed=2).requires_grad_()
    transforms = [Permute([1, 2, 0], c_t=3)] if with_transform else None
    loss = build_loss(name, [3], [3], transforms=transforms).double()
    terms = loss(batch([s], [t]))
    sum(terms.values()).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    for p in loss.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert (len(list(loss.parameters())) > 0) == (name in {"fitnets", "ab", "rco"})


def test_kd_gradient_reaches_student_logits_only():
    b = batch()
    b.student_logits.requires_grad_()
    b.teacher_logits.requires_grad_()
    build_loss("kd", [], [])(b)["kd"].backward()
    assert b.student_logits.grad.abs().sum() > 0
    assert b.teacher_logits.grad is None


# --- errors --------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_method_lists_known_ones():
    with pytest.raises(KcdError) as error:
        build_loss("hint", [3], [3])
    message = one_line(error)
    assert all(name in message for name in ("kd", "fitnets", "at", "ab", "rkd", "rco", "l2"))


def test_baseline_has_no_loss():
    with pytest.raises(KcdError, match="cross-entropy only"):
        build_loss("baseline", [], [])


def test_unknown_option_names_method_and_accepted_options():
    with pytest.raises(KcdError) as error:
        build_loss("kd", [], [], temprature=2)
    message = one_line(error)
    assert all(word in message for word in ("temprature", "'kd'", "temperature", "t_squared"))
    with pytest.raises(KcdError, match="accepted: none"):
        build_loss("l2", [3], [3], margin=1)


def test_wrong_channel_count_names_expected_and_got():
    loss = build_loss("l2", [3], [3])
    with pytest.raises(KcdError) as error:
        loss(batch([rand(B, 4, 2, 2, seed=1)], [rand(B, 3, 2, 2, seed=2)]))
    assert "student" in one_line(error) and "3 channels, got 4" in one_line(error)
    with pytest.raises(KcdError, match="teacher feature of pair 0 should have 3 channels, got 5"):
        loss(batch([rand(B, 3, 2, 2, seed=1)], [rand(B, 5, 2, 2, seed=2)]))


def test_missing_teacher_logits():
    for name, channels in (("kd", []), ("rco", [3])):
        feats = [rand(B, 3, 2, 2, seed=1)] if channels else []
        with pytest.raises(KcdError, match="teacher_logits is None"):
            build_loss(name, channels, channels)(batch(feats, feats, teacher_logits=False))


@pytest.mark.parametrize(
    "name, student, teacher, options, message",
    [
        ("l2", [3], [5], {}, "add a transform .* or use fitnets"),
        ("l2", [3], [4], {"transforms": [Permute([0, 1, 2], c_t=5)]}, "expects 5 teacher channels"),
        ("rkd", [3], [5], {"transforms": [Permute([0, 1], c_t=5)]}, "KCD L2 term"),
        ("kd", [3], [3], {"transforms": [Permute([0, 1, 2], c_t=3)]}, "logits only"),
        ("fitnets", [], [], {}, "at least one"),
        ("fitnets", [3, 2], [3], {}, "one of each per pair"),
        ("fitnets", [3], [3], {"transforms": [None, None]}, r"one \(or None\) per pair"),
        ("kd", [], [], {"weight": -1}, ">= 0"),
        ("kd", [], [], {"temperature": 0}, "positive"),
        ("ab", [3], [3], {"margin": -1}, "positive"),
    ],
)
def test_bad_builds(name, student, teacher, options, message):
    with pytest.raises(KcdError, match=message) as error:
        build_loss(name, student, teacher, **options)
    one_line(error)


def test_bad_batches():
    l2 = build_loss("l2", [3], [3])
    with pytest.raises(KcdError, match="4x4 student feature but a 2x2 teacher feature") as error:
        l2(batch([rand(B, 3, 4, 4, seed=1)], [rand(B, 3, 2, 2, seed=2)]))
    one_line(error)
    with pytest.raises(KcdError, match="built for 1 feature pairs but got 0 student"):
        l2(batch([], []))
    single = DistillBatch(
        torch.zeros(1), rand(1, 2, seed=0), None, [rand(1, 3, seed=1)], [rand(1, 3, seed=2)]
    )
    with pytest.raises(KcdError, match="2 or more"):
        build_loss("rkd", [3], [3])(single)


# --- registry ------------------------------------------------------------------------------


def test_registry_defaults_follow_section_4_1():
    weights = {name: spec.default_weight for name, spec in LOSSES.items()}
    assert weights == {
        "kd": 16, "fitnets": 100, "at": 1000, "ab": 10, "rkd": 10, "rco": 100, "l2": 100
    }
    assert LOSSES.get("kd").default_options == {"temperature": 4.0, "t_squared": False}
    assert LOSSES.get("rco").default_options == {"kd_weight": 16.0, "temperature": 4.0}
    assert LOSSES.get("rkd").default_options == {
        "dist_weight": 1.0, "angle_weight": 2.0, "l2_weight": 100.0
    }
    assert [n for n, s in LOSSES.items() if s.uses_logits] == ["kd", "rco"]
    assert [n for n, s in LOSSES.items() if not s.uses_features] == ["kd"]
    assert "baseline" not in LOSSES


def test_build_loss_overrides_weight_and_options():
    b = batch()
    loss = build_loss("kd", [], [], weight=9, temperature=2)
    expected = 9 * manual_softened_kl(np_(b.student_logits), np_(b.teacher_logits), 2.0)
    assert loss.weight == 9 and loss(b)["kd"].item() == pytest.approx(expected, rel=1e-9)
    assert isinstance(build_loss("ab", [3], [3]), ABLoss)
