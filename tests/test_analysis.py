"""Table 10 (channel overlap) and Figure 1 (class activation maps) on tiny tensors and models."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from kcd.analysis.activation_maps import (
    activation_figure,
    channel_grid,
    class_activation_map,
    plot_activation_maps,
    tile_channels,
)
from kcd.analysis.overlap import (
    class_channel_means,
    column_name,
    leading_channels,
    overlap_table,
    resolve_k,
    topk_overlap,
)
from kcd.consistency import consistency_matrix, gamma
from kcd.errors import KcdError
from kcd.transforms import ChannelTransform, build_transform, match


def tiny_net(c_in: int, c_out: int, seed: int) -> nn.Module:
    """conv-relu-conv with the last conv named "feat" (the tapped layer)."""
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(c_in, 6, 3, padding=1), relu=nn.ReLU(), feat=nn.Conv2d(6, c_out, 1),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
    ))


def make_batches(n_batches: int = 3, b: int = 8, c: int = 3, hw: int = 4, classes: int = 3,
                 seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, c, hw, hw, generator=g), torch.randint(0, classes, (b,), generator=g))
            for _ in range(n_batches)]


# ---- topk_overlap ------------------------------------------------------------------------


def test_topk_overlap_identical_and_disjoint():
    a = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4]])
    assert topk_overlap(a, a, 2) == 100.0
    assert topk_overlap(a, -a, 2) == 0.0
    assert topk_overlap(a, a, 0.5) == 100.0  # fraction: 2 of 4 channels


def test_topk_overlap_worked_example():
    a = torch.tensor([[9.0, 8, 7, 1, 0], [0, 1, 2, 3, 4]])
    b = torch.tensor([[9.0, 1, 8, 7, 0], [4, 3, 2, 1, 0]])
    # class 0: {0,1,2} vs {0,2,3} -> 2/3; class 1: {4,3,2} vs {0,1,2} -> 1/3; mean 50 %
    assert topk_overlap(a, b, 3) == pytest.approx(50.0)
    # top-1: class 0 agrees, class 1 does not
    assert topk_overlap(a, b, 1) == pytest.approx(50.0)


def test_topk_overlap_skips_absent_classes_and_cuts_wider_matrix():
    a = torch.tensor([[3.0, 2, 1], [math.nan] * 3])
    b = torch.tensor([[3.0, 2, 1, 99, 98], [1, 2, 3, 4, 5]])  # wider: only channels 0..2 count
    assert topk_overlap(a, b, 2) == 100.0
    assert torch.equal(leading_channels(b, 3), b[:, :3])


def test_k_larger_than_channels_fails():
    a = torch.rand(2, 4)
    with pytest.raises(KcdError, match="k=5 exceeds the channel count 4"):
        topk_overlap(a, a, 5)
    for bad in (0, 1.0, -0.1, True):
        with pytest.raises(KcdError):
            resolve_k(bad, 4)
    assert resolve_k(0.05, 64) == 3 and resolve_k(0.01, 10) == 1
    assert column_name(10) == "top10" and column_name(0.05) == "top5%"


def test_overlap_table_rows():
    a = torch.tensor([[4.0, 3, 2, 1]])
    rows = overlap_table({"S": a, "T": -a, "T(T)": a},
                         [("S vs T", "S", "T"), ("S vs T(T)", "S", "T(T)")], [2, 0.25])
    assert rows == [{"models": "S vs T", "top2": 0.0, "top25%": 0.0},
                    {"models": "S vs T(T)", "top2": 100.0, "top25%": 100.0}]
    with pytest.raises(KcdError, match="'S2'"):
        overlap_table({"S": a}, [("S vs S2", "S", "S2")], [1])


# ---- class_channel_means -----------------------------------------------------------------


def test_class_channel_means_matches_direct_computation():
    model = tiny_net(3, 5, seed=1)
    batches = make_batches(classes=4)  # class 3 may be absent: force it
    batches = [(x, y.clamp(max=2)) for x, y in batches]
    means = class_channel_means(model, "feat", batches, num_classes=4)

    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        pooled = model.feat(model.relu(model.stem(x))).mean(dim=(2, 3)).double()
    assert means.shape == (4, 5) and means.dtype == torch.float64
    for c in range(3):
        assert torch.allclose(means[c], pooled[y == c].mean(0), atol=1e-6)
    assert torch.isnan(means[3]).all()

    transform = ChannelTransform(torch.tensor([4, 0, 2]), c_t=5)
    picked = class_channel_means(model, "feat", batches, num_classes=4, transform=transform)
    assert torch.allclose(picked[:3], means[:3, [4, 0, 2]], atol=1e-6)


def test_class_channel_means_rejects_bad_labels():
    batches = [(torch.randn(2, 3, 4, 4), torch.tensor([0, 7]))]
    with pytest.raises(KcdError, match="outside 0..2"):
        class_channel_means(tiny_net(3, 4, 0), "feat", batches, num_classes=3)


# ---- the paper's claim at tiny scale -----------------------------------------------------


def test_bipartite_transform_restores_overlap_and_lowers_distance():
    """Student = channel permutation of the teacher plus small noise: the bipartite transform
    recovers the permutation, so T(T) shares the student's top channels and is closer in L2."""
    c, classes = 16, 4
    g = torch.Generator().manual_seed(0)
    teacher = nn.Sequential(OrderedDict(feat=nn.Identity()))
    perm = torch.randperm(c, generator=g)
    mix = torch.eye(c)[perm] + 0.01 * torch.randn(c, c, generator=g)  # student[j] ~ teacher[perm[j]]
    student = nn.Sequential(OrderedDict(feat=nn.Conv2d(c, c, 1, bias=False)))
    student.feat.weight.data.copy_(mix[:, :, None, None])

    patterns = 3 * torch.randn(classes, c, generator=g)
    batches = []
    for _ in range(4):
        y = torch.arange(16) % classes
        x = patterns[y][:, :, None, None] + torch.randn(16, c, 3, 3, generator=g)
        batches.append((x, y))
    x_all = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        feat_t, feat_s = teacher(x_all), student(x_all)

    m = consistency_matrix(feat_t.mean(dim=(2, 3)), feat_s.mean(dim=(2, 3)), "correlation")
    transform = build_transform(m, "bipartite")
    assert torch.equal(transform.index, perm)

    means = {
        "S": class_channel_means(student, "feat", batches, classes),
        "T": class_channel_means(teacher, "feat", batches, classes),
        "T(T)": class_channel_means(teacher, "feat", batches, classes, transform=transform),
    }
    rows = overlap_table(means, [("S vs T", "S", "T"), ("S vs T(T)", "S", "T(T)")], [4, 0.5])
    raw, fixed = rows
    assert fixed["top4"] == 100.0 and fixed["top50%"] == 100.0
    assert raw["top4"] < fixed["top4"] and raw["top50%"] < fixed["top50%"]

    assert (transform(feat_t) - feat_s).norm() < 0.2 * (feat_t - feat_s).norm()

    g_bipartite = gamma(m, transform.index)
    assert g_bipartite >= gamma(m, match(m, "identity")) - 1e-9
    assert g_bipartite >= gamma(m, match(m, "random", seed=3)) - 1e-9


# ---- Figure 1 ----------------------------------------------------------------------------


def test_channel_grid_and_tiles():
    assert channel_grid(64) == (8, 8)
    assert channel_grid(10) == (3, 4)
    tiled = tile_channels(torch.arange(10 * 4, dtype=torch.float64).reshape(10, 2, 2))
    assert tiled.shape == (3 * 3 - 1, 4 * 3 - 1)
    assert tiled[0, 3] == 4 and torch.isnan(tiled[2, :]).all()  # channel 1 at column 1; gap row
    assert torch.isnan(tiled[-1, -1])  # unused cells stay blank


def test_class_activation_map_and_bad_class():
    model = tiny_net(3, 4, seed=2)
    batches = make_batches()
    mean_map = class_activation_map(model, "feat", batches, class_index=1, num_classes=3)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        direct = model.feat(model.relu(model.stem(x[y == 1]))).double().mean(0)
    assert torch.allclose(mean_map, direct, atol=1e-6)
    for bad in (3, -1):
        with pytest.raises(KcdError, match=f"class {bad} "):
            class_activation_map(model, "feat", batches, class_index=bad, num_classes=3)


def test_plot_writes_png_and_pdf(tmp_path):
    g = torch.Generator().manual_seed(0)
    s1, s2, tt = (torch.rand(6, 3, 3, generator=g) for _ in range(3))
    t = torch.rand(9, 3, 3, generator=g)  # wider raw teacher: leading 6 channels shown
    png, pdf = plot_activation_maps(s1, s2, t, tt, tmp_path / "fig1", title="class 0")
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig1.pdf", "fig1.png"]  # no temp files


def test_activation_figure_end_to_end_and_bad_class(tmp_path):
    students = (tiny_net(3, 4, seed=3), tiny_net(3, 4, seed=4))
    teacher = tiny_net(3, 6, seed=5)
    transform = ChannelTransform(torch.tensor([5, 1, 0, 3]), c_t=6)
    batches = make_batches()
    png, pdf = activation_figure(students, teacher, transform, ("feat", "feat"), batches,
                                 class_index=0, num_classes=3, out_prefix=tmp_path / "f")
    assert png.exists() and pdf.exists()
    with pytest.raises(KcdError, match="class 3 "):
        activation_figure(students, teacher, transform, ("feat", "feat"), batches,
                          class_index=3, num_classes=3, out_prefix=tmp_path / "g")


def _pair_files(tmp_path, c_t=6, c_s=4, teacher="resnet56", student="resnet20"):
    from kcd.checkpoint import atomic_save
    from kcd.consistency import ConsistencyStatistics
    from kcd.transforms import save_transform

    g = torch.Generator().manual_seed(0)
    ft = torch.randn(40, c_t, generator=g)
    fs = ft[:, torch.tensor([3, 0, 5, 1])[:c_s]] + 0.1 * torch.randn(40, c_s, generator=g)
    stats = ConsistencyStatistics(c_t, c_s, metrics=["correlation"])
    stats.update(ft, fs)
    atomic_save({"kind": "kcd-statistics", "teacher": teacher, "student": student,
                 "layers": ["layer3", "layer3"], "num_classes": 10,
                 "global": stats.state_dict(), "groups": {}}, tmp_path / "stats.pt")
    t = build_transform(stats.matrix("correlation"), "bipartite",
                        meta={"teacher": teacher, "student": student})
    save_transform(t, tmp_path / "t.pt")
    return tmp_path / "stats.pt", tmp_path / "t.pt", t


def test_heatmap_marks_the_transforms_matches_and_lists_them(tmp_path):
    import csv

    from kcd.analysis.heatmap import consistency_heatmap

    stats, transform, t = _pair_files(tmp_path)
    out = consistency_heatmap(stats, transform, "correlation", tmp_path / "h")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "h.csv").open()))
    assert [int(r["teacher_channel"]) for r in rows] == [3, 0, 5, 1] == t.index.tolist()
    assert all(float(r["consistency_correlation"]) > 0.9 for r in rows)
    assert out["gamma_after"] > 3.6  # four matches of correlation > 0.9


def test_heatmap_refuses_a_transform_of_another_pair(tmp_path):
    from kcd.analysis.heatmap import consistency_heatmap

    stats, _, _ = _pair_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, transform, _ = _pair_files(other, student="resnet32")
    with pytest.raises(KcdError, match="was made for resnet56 -> resnet32"):
        consistency_heatmap(stats, transform, "correlation", tmp_path / "h")
