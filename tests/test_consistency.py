"""Consistency matrices: direct and streaming computation against an independent numpy reference."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import scipy.special
import torch
from scipy.spatial.distance import cdist

import kcd.consistency as consistency
from kcd import naming
from kcd.consistency import (
    EPS,
    METRICS,
    MOMENTS,
    Accumulator,
    Block,
    ConsistencyStatistics,
    Metric,
    consistency_matrix,
    diagonal_consistency,
    gamma,
)
from kcd.errors import KcdError
from kcd.registry import Registry

N, C_T, C_S = 60, 6, 5


def reference(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """M (c_T x c_S) in float64 numpy/scipy, written independently of kcd."""
    c_t = a.shape[1]
    if metric == "l1":
        return 1.0 / (cdist(a.T, b.T, "cityblock") + EPS)
    if metric == "l2":
        return 1.0 / (cdist(a.T, b.T, "euclidean") + EPS)
    if metric == "correlation":
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(a.T, b.T)[:c_t, c_t:]
        return np.nan_to_num(corr, nan=0.0)
    if metric == "cosine":
        return 1.0 - cdist(a.T, b.T, "cosine")
    if metric == "kl":
        p = scipy.special.softmax(a, axis=0)
        q = scipy.special.softmax(b, axis=0)
        kl = scipy.special.rel_entr(p[:, :, None], q[:, None, :]).sum(axis=0)
        return 1.0 / (kl + EPS)
    raise AssertionError(metric)


def assert_matches(got: torch.Tensor, ref: np.ndarray, metric: str) -> None:
    """Within 1e-6: relative for the inverse distances, absolute for the bounded scores.

    kl is compared as divergences, within 1e-6 relative or absolute: the float32 block products
    of the streaming statistics err by ~1e-7 absolute on features of unit spread, which is more
    than 1e-6 relative for the small divergences between a few samples.
    """
    assert got.dtype == torch.float64
    if metric == "kl":
        divergence = 1.0 / got.numpy() - EPS
        np.testing.assert_allclose(divergence, 1.0 / ref - EPS, rtol=1e-6, atol=1e-6)
        return
    atol = 1e-6 if metric in ("correlation", "cosine") else 0.0
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=atol)


def features(mean: float = 0.0, std: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(mean, std, size=(N, C_T))
    b = 0.5 * a[:, :C_S] + rng.normal(mean, std, size=(N, C_S))  # some real correlation
    return a, b


def stream(a: np.ndarray, b: np.ndarray, sizes: list[int], metrics=METRICS):
    stats = ConsistencyStatistics(a.shape[1], b.shape[1], metrics)
    start = 0
    for size in sizes:
        batch = slice(start, start + size)
        stats.update(torch.from_numpy(a[batch]), torch.from_numpy(b[batch]))
        start += size
    assert start == len(a) and stats.n == len(a)
    return stats


SPLITS = {"one batch": [N], "size 1": [1] * N, "uneven": [7] * 8 + [4]}


@pytest.mark.parametrize("metric", METRICS)
def test_direct_matches_reference(metric):
    a, b = features()
    assert_matches(consistency_matrix(torch.from_numpy(a), torch.from_numpy(b), metric),
                   reference(a, b, metric), metric)


@pytest.mark.parametrize("split", SPLITS)
def test_streaming_matches_reference_for_every_metric(split):
    a, b = features(seed=1)
    stats = stream(a, b, SPLITS[split])
    for metric in METRICS:
        assert_matches(stats.matrix(metric), reference(a, b, metric), metric)


@pytest.mark.parametrize("split", ["one batch", "uneven"])
def test_streaming_is_stable_when_mean_dominates_std(split):
    a, b = features(mean=50.0, std=1.0, seed=2)
    stats = stream(a, b, SPLITS[split])
    for metric in METRICS:
        assert_matches(stats.matrix(metric), reference(a, b, metric), metric)


def test_streaming_from_float32_features():
    a, b = features(seed=3)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    stats = ConsistencyStatistics(C_T, C_S)
    stats.update(torch.from_numpy(a32), torch.from_numpy(b32))
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    for metric in METRICS:
        assert_matches(stats.matrix(metric), reference(a64, b64, metric), metric)


def test_save_load_roundtrip_and_resume(tmp_path):
    a, b = features(seed=4)
    stats = stream(a[:30], b[:30], [13, 17])
    path = tmp_path / "stats" / "layer.pt"
    stats.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["layer.pt"]  # no temporary file left
    raw = torch.load(path, weights_only=True)
    assert raw["n"] == 30 and raw["metrics"] == list(METRICS)
    loaded = ConsistencyStatistics.load(path)
    for metric in METRICS:
        assert torch.equal(loaded.matrix(metric), stats.matrix(metric))
    loaded.update(torch.from_numpy(a[30:]), torch.from_numpy(b[30:]))
    for metric in METRICS:
        assert_matches(loaded.matrix(metric), reference(a, b, metric), metric)


@pytest.mark.parametrize("mean", [0.0, 50.0])
def test_merge_of_disjoint_batches_equals_all(mean):
    a, b = features(mean=mean, seed=5)
    first = stream(a[:25], b[:25], [10, 15])
    second = stream(a[25:] + 3.0, b[25:] - 2.0, [35])  # other shifts than `first`
    second_data = (a[25:] + 3.0, b[25:] - 2.0)
    first.merge(second)
    a_all = np.concatenate([a[:25], second_data[0]])
    b_all = np.concatenate([b[:25], second_data[1]])
    assert first.n == N
    for metric in METRICS:
        assert_matches(first.matrix(metric), reference(a_all, b_all, metric), metric)


def test_merge_into_empty_and_of_empty():
    a, b = features(seed=6)
    full = stream(a, b, [N])
    empty = ConsistencyStatistics(C_T, C_S)
    empty.merge(full)
    full.merge(ConsistencyStatistics(C_T, C_S))
    for metric in METRICS:
        assert torch.equal(empty.matrix(metric), full.matrix(metric))


def test_only_requested_metrics_are_accumulated():
    a, b = features(seed=7)
    stats = stream(a, b, [N], metrics=["correlation"])
    assert_matches(stats.matrix("correlation"), reference(a, b, "correlation"), "correlation")
    with pytest.raises(KcdError, match="'l1' was not accumulated.*correlation"):
        stats.matrix("l1")
    assert set(stats.state_dict()["tensors"]) == {"shift_t", "shift_s", "sum_t", "sum_s", "sq_t",
                                                  "sq_s", "cross"}


def test_constant_channel_has_zero_correlation():
    a, b = features(seed=8)
    a[:, 2] = 0.1  # a float mean of 0.1s is not exactly 0.1
    b[:, 0] = 0.0
    direct = consistency_matrix(torch.from_numpy(a), torch.from_numpy(b), "correlation")
    streamed = stream(a, b, [7] * 8 + [4]).matrix("correlation")
    for m in (direct, streamed):
        assert torch.all(m[2] == 0) and torch.all(m[:, 0] == 0)
        assert_matches(m, reference(a, b, "correlation"), "correlation")
    cosine = stream(a, b, [N]).matrix("cosine")
    assert torch.all(cosine[:, 0] == 0)


def test_identical_channels_score_inverse_eps():
    x = torch.randn(20, 3, dtype=torch.float64)
    for metric in ("l1", "l2", "kl"):
        assert torch.allclose(consistency_matrix(x, x, metric).diagonal(),
                              torch.full((3,), 1 / EPS, dtype=torch.float64))


@pytest.mark.parametrize("metric", METRICS)
def test_diagonal_consistency_is_the_matrix_diagonal_and_differentiable(metric):
    t = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(30, 4, dtype=torch.float64)
    diag = diagonal_consistency(t, s, metric)
    assert torch.allclose(diag, consistency_matrix(t.detach(), s, metric).diagonal())
    diag.sum().backward()
    assert torch.isfinite(t.grad).all()


def test_diagonal_consistency_gradient_is_finite_at_degenerate_points():
    t = torch.zeros(10, 2, dtype=torch.float64, requires_grad=True)  # constant and identical
    s = torch.zeros(10, 2, dtype=torch.float64)
    for metric in METRICS:
        diagonal_consistency(t, s, metric).sum().backward()
        assert torch.isfinite(t.grad).all(), metric
        t.grad = None


def test_gamma_sums_matched_entries():
    m = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    assert gamma(m, torch.tensor([0, 1, 2])) == 0 + 4 + 8
    assert gamma(m, [3, 3, 0]) == 9 + 10 + 2
    with pytest.raises(KcdError, match="one teacher channel per student channel"):
        gamma(m, [0, 1])
    with pytest.raises(KcdError, match="outside 0..3"):
        gamma(m, [0, 1, 4])


# ---- bad input ---------------------------------------------------------------------------


def test_mismatched_sample_counts():
    with pytest.raises(KcdError, match="teacher has N=10 samples but student has N=9"):
        consistency_matrix(torch.randn(10, 3), torch.randn(9, 3), "l2")
    stats = ConsistencyStatistics(3, 3)
    with pytest.raises(KcdError, match="teacher has N=4 samples but student has N=5"):
        stats.update(torch.randn(4, 3), torch.randn(5, 3))


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_name_the_side(side, bad):
    t, s = torch.randn(8, 3), torch.randn(8, 3)
    (t if side == "teacher" else s)[3, 1] = bad
    with pytest.raises(KcdError, match=f"{side} features contain NaN or inf"):
        consistency_matrix(t, s, "correlation")
    with pytest.raises(KcdError, match=f"{side} features contain NaN or inf"):
        ConsistencyStatistics(3, 3).update(t, s)


def test_wrong_channel_count_to_update():
    stats = ConsistencyStatistics(4, 3)
    with pytest.raises(KcdError, match="teacher batch has 5 channels but .* expects c_T=4"):
        stats.update(torch.randn(8, 5), torch.randn(8, 3))
    with pytest.raises(KcdError, match="student batch has 2 channels but .* expects c_S=3"):
        stats.update(torch.randn(8, 4), torch.randn(8, 2))
    assert stats.n == 0


def test_features_must_be_pooled_2d():
    with pytest.raises(KcdError, match=r"teacher features must be pooled 2-D .* \(8, 3, 2, 2\)"):
        consistency_matrix(torch.randn(8, 3, 2, 2), torch.randn(8, 3), "l1")


def test_unknown_metric_lists_accepted_values():
    accepted = "known: l1, l2, correlation, cosine, kl"
    with pytest.raises(KcdError, match=f"unknown consistency metric 'l3'; {accepted}"):
        consistency_matrix(torch.randn(4, 2), torch.randn(4, 2), "l3")
    with pytest.raises(KcdError, match=f"unknown consistency metric 'pearson'; {accepted}"):
        ConsistencyStatistics(2, 2, metrics=["l2", "pearson"])
    with pytest.raises(KcdError, match=accepted):
        ConsistencyStatistics(2, 2).matrix("euclid")


def test_no_samples_yet():
    with pytest.raises(KcdError, match="no samples accumulated yet"):
        ConsistencyStatistics(2, 2).matrix("l2")


def test_merge_mismatch():
    with pytest.raises(KcdError, match="cannot merge statistics of c_T=3, c_S=2"):
        ConsistencyStatistics(2, 2).merge(ConsistencyStatistics(3, 2))
    with pytest.raises(KcdError, match="metrics kl into"):
        ConsistencyStatistics(2, 2, ["l1"]).merge(ConsistencyStatistics(2, 2, ["kl"]))


def test_load_rejects_other_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(KcdError, match="garbage.pt is unreadable or truncated"):
        ConsistencyStatistics.load(garbage)
    other = tmp_path / "other.pt"
    torch.save({"format": "something else"}, other)
    with pytest.raises(KcdError, match="other.pt is not a kcd.consistency_statistics file"):
        ConsistencyStatistics.load(other)
    with pytest.raises(KcdError, match="missing.pt does not exist"):
        ConsistencyStatistics.load(tmp_path / "missing.pt")
    stats = ConsistencyStatistics(3, 2, ["l2"])
    with pytest.raises(KcdError, match="does not fit c_T=3, c_S=2"):
        stats.load_state_dict(ConsistencyStatistics(3, 3, ["l2"]).state_dict())


# ---- block buffering ---------------------------------------------------------------------


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 samples, pieces of 2 samples, products of 2 teacher channels at a time."""
    monkeypatch.setattr(consistency, "_BLOCK_ROWS", (4, 8))
    monkeypatch.setattr(consistency, "_PIECE_ELEMENTS", 2 * C_T)
    monkeypatch.setattr(consistency, "_PRODUCT_ELEMENTS", 2 * C_S)


@pytest.mark.parametrize("split", [*SPLITS, "larger than a block"])
@pytest.mark.parametrize("mean", [0.0, 50.0])
def test_streaming_across_blocks_matches_reference(small_blocks, split, mean):
    a, b = features(mean=mean, seed=9)
    ramp = np.linspace(0.0, 3.0, N)[:, None]  # maxima keep growing: V is rescaled at every block
    a, b = a + ramp, b - ramp
    sizes = [23, 37] if split == "larger than a block" else SPLITS[split]
    stats = stream(a, b, sizes)
    assert stats._block_rows == 8
    for metric in METRICS:
        assert_matches(stats.matrix(metric), reference(a, b, metric), metric)


def test_reads_between_updates_flush_the_buffer(small_blocks, tmp_path):
    a, b = features(seed=10)
    stats = ConsistencyStatistics(C_T, C_S)
    for start, stop in [(0, 5), (5, 21), (21, 30), (30, 45), (45, N)]:
        stats.update(torch.from_numpy(a[start:stop]), torch.from_numpy(b[start:stop]))
        for metric in METRICS:  # mid-block reads see every sample so far
            assert_matches(stats.matrix(metric), reference(a[:stop], b[:stop], metric), metric)
        stats.save(tmp_path / "mid.pt")
        loaded = ConsistencyStatistics.load(tmp_path / "mid.pt")
        assert loaded.n == stop
        for metric in METRICS:
            assert torch.equal(loaded.matrix(metric), stats.matrix(metric))


def test_merge_flushes_both_buffers(small_blocks):
    a, b = features(seed=11)
    first = stream(a[:21], b[:21], [5, 16])  # 5 samples still buffered
    second = stream(a[21:], b[21:], [30, 9])  # 7 samples still buffered
    assert first._fill and second._fill
    first.merge(second)
    for metric in METRICS:
        assert_matches(first.matrix(metric), reference(a, b, metric), metric)


def test_sample_buffer_is_bounded(small_blocks):
    a, b = features(seed=12)
    stats = ConsistencyStatistics(C_T, C_S)
    sizes = []
    for _ in range(5):
        stats.update(torch.from_numpy(a), torch.from_numpy(b))
        sizes.append(stats.workspace_bytes)
    assert sizes == [8 * (C_T + C_S) * 4] * 5  # one block of float32 rows, whatever N
    l1_only = stream(a, b, [N], metrics=["l1"])
    assert l1_only.workspace_bytes == 0


def test_huge_finite_features_are_not_mistaken_for_inf():
    big = torch.full((8, 3), 3e38)  # their float32 sum overflows; every value is finite
    ConsistencyStatistics(3, 3, ["l2"]).update(big, big)
    assert consistency_matrix(big, big, "l1").shape == (3, 3)


# ---- independence of the batching ----------------------------------------------------------


def pooled_like(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Features with mean ≫ std (3 teacher, 2 student channels).

    With ``classes``, the samples are sorted by class and the class means lie 10 stds apart, so
    consecutive batches have means far from the global mean.
    """
    a = rng.normal(1000.0, 1.0, size=(n, 3))
    if classes:
        labels = np.sort(rng.integers(0, classes, size=n))
        a += rng.normal(0.0, 10.0, size=(classes, 3))[labels]
    b = 0.5 * a[:, :2] + rng.normal(0.0, 1.0, size=(n, 2))  # some real correlation
    return a, b


def random_sizes(rng: np.random.Generator, n: int) -> list[int]:
    """Batch sizes summing to ``n``: a first batch of 1 sample, then a few random ones."""
    cuts = np.sort(rng.choice(np.arange(2, n), size=3, replace=False))
    return np.diff([0, 1, *cuts, n]).tolist()


@pytest.mark.parametrize("blocks", ["one block", "blocks of 8"])
@pytest.mark.parametrize("classes", [0, 4])
def test_streaming_does_not_depend_on_the_batching(request, blocks, classes):
    """One batch, a 1-sample batch then random ones, or one sample at a time: the same M."""
    if blocks == "blocks of 8":
        request.getfixturevalue("small_blocks")
    metrics = ("correlation", "cosine", "l2", "kl")
    for seed in range(25):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(8, 24))
        a, b = pooled_like(rng, n, classes)
        whole, *others = [stream(a, b, sizes, metrics)
                          for sizes in ([n], random_sizes(rng, n), [1] * n)]
        for stats in others:
            for metric in metrics:
                np.testing.assert_allclose(stats.matrix(metric), whole.matrix(metric),
                                           rtol=1e-9, atol=1e-12, err_msg=f"{seed=} {metric}")


def test_streaming_after_a_1_sample_batch_matches_float64():
    """Against float64 within 1e-6, above the float32 rounding of the block products.

    That rounding is up to ~3e-7 of a correlation of 1 for one block of a few hundred samples.
    Products of samples minus a shift taken from the 1-sample first batch, not centred per block,
    err by up to ~3e-6.
    """
    metrics = ("correlation", "cosine", "l2")
    for seed in range(100):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(100, 512))  # one block of samples: the longest float32 products
        a, b = pooled_like(rng, n, classes=0)
        stats = stream(a, b, random_sizes(rng, n), metrics)
        for metric in metrics:
            atol = 0.0 if metric == "l2" else 1e-6  # l2 scores are ~1e-4: relative only
            np.testing.assert_allclose(stats.matrix(metric), reference(a, b, metric),
                                       rtol=1e-6, atol=atol, err_msg=f"{seed=} {metric}")


# ---- the metric registry -------------------------------------------------------------------

STREAM_SPLITS = {"one batch": [N], "size 1 then uneven": [1, 6, 13, 40], "size 7": [7] * 8 + [4]}


def assert_close_to_direct(got: torch.Tensor, direct: torch.Tensor, metric: str) -> None:
    """Streamed against direct: as :func:`assert_matches`, which checks against float64."""
    assert got.shape == direct.shape
    assert_matches(got, direct.numpy(), metric)


def test_registered_metrics_and_their_table_labels():
    assert list(METRICS) == ["l1", "l2", "correlation", "cosine", "kl"]
    assert consistency.metric_names() == ("l1", "l2", "correlation", "cosine", "kl")
    labels = {name: METRICS[name].label for name in METRICS}
    assert labels == {"l1": "L1", "l2": "L2", "correlation": "Correlation", "cosine": "Cosine",
                      "kl": "KL Divergence"}  # the row labels of Table 2
    assert labels == dict(naming.METRICS.items())  # the torch-free names the tables read
    for name, metric in METRICS.items():
        assert isinstance(metric, Metric) and metric.name == name and metric.accumulators


@pytest.mark.parametrize("blocks", ["one block", "blocks of 8"])
@pytest.mark.parametrize("split", STREAM_SPLITS)
@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_streams_to_its_direct_formula(request, metric, split, blocks):
    if blocks == "blocks of 8":
        request.getfixturevalue("small_blocks")
    a, b = features(mean=3.0, seed=13)
    direct = METRICS[metric].matrix(torch.from_numpy(a), torch.from_numpy(b))
    stats = stream(a, b, STREAM_SPLITS[split], metrics=[metric])
    assert_close_to_direct(stats.matrix(metric), direct, metric)


def test_metrics_share_identical_accumulators():
    """l2, cosine and correlation read one set of moments: one cross product, not three."""
    moment_metrics = ("l2", "cosine", "correlation")
    assert all(METRICS[m].accumulators == (MOMENTS,) for m in moment_metrics)
    # fed in this order: kl's accumulator spends the block rows after the moments read them
    assert [acc.name for acc in consistency._accumulators_of(METRICS)] == ["moments", "softmax",
                                                                            "l1"]
    a, b = features(seed=14)
    together = stream(a, b, [N], metrics=moment_metrics).state_dict()["tensors"]
    alone = stream(a, b, [N], metrics=["correlation"]).state_dict()["tensors"]
    assert together.keys() == alone.keys()
    assert sum(t.dim() == 2 for t in together.values()) == 1  # the cross product, once
    for key in alone:
        assert torch.equal(together[key], alone[key])


def test_state_layout_is_that_of_statistics_files_on_disk():
    """The tensors saved per metric; statistics files written before keep loading."""
    moments = {"sum_t", "sum_s", "sq_t", "sq_s", "cross"}
    softmax = {"max_t", "z_t", "u_t", "max_s", "z_s", "v"}
    expected = {"l1": {"l1"}, "l2": moments, "correlation": moments, "cosine": moments,
                "kl": softmax}
    for metric, keys in expected.items():
        stats = ConsistencyStatistics(C_T, C_S, [metric])
        assert set(stats.state_dict()["tensors"]) == {"shift_t", "shift_s"} | keys, metric
    everything = ConsistencyStatistics(C_T, C_S).state_dict()["tensors"]
    assert list(everything) == ["shift_t", "shift_s", "sum_t", "sum_s", "sq_t", "sq_s", "cross",
                                "max_t", "z_t", "u_t", "max_s", "z_s", "v", "l1"]


@pytest.mark.parametrize("metrics", [list(METRICS), ["kl", "l2"], ["l1"]])
def test_state_round_trip_resumes_exactly(tmp_path, metrics):
    a, b = features(mean=20.0, seed=15)
    stats = stream(a[:33], b[:33], [1, 32], metrics)
    state = stats.state_dict()
    stats.save(tmp_path / "stats.pt")
    for restored in (ConsistencyStatistics.from_state_dict(copy.deepcopy(state)),
                     ConsistencyStatistics.load(tmp_path / "stats.pt")):
        assert restored.metrics == tuple(metrics) and restored.n == 33
        for key, value in restored.state_dict()["tensors"].items():
            assert torch.equal(value, state["tensors"][key]), key
        restored.update(torch.from_numpy(a[33:]), torch.from_numpy(b[33:]))
        stats.update(torch.from_numpy(a[33:]), torch.from_numpy(b[33:]))
        for metric in metrics:
            assert torch.equal(restored.matrix(metric), stats.matrix(metric)), metric
        stats = ConsistencyStatistics.from_state_dict(copy.deepcopy(state))  # from the save


# ---- a metric added by registration alone -------------------------------------------------


class _LargestDifference(Accumulator):
    """``max_n |a_ni - b_nj|`` from whole batches: an accumulator that is not buffered."""

    name = "test-largest-difference"

    def empty(self, c_t, c_s, device):
        return {"largest": torch.zeros(c_t, c_s, dtype=torch.float64, device=device)}

    def add_batch(self, state, x_t, x_s):
        batch = torch.cdist(x_t.double().T, x_s.double().T, p=float("inf"))
        torch.maximum(state["largest"], batch, out=state["largest"])

    def merge(self, state, work, theirs, n, d_t, d_s):
        torch.maximum(state["largest"], theirs["largest"], out=state["largest"])


class _SpentTeacherSums(Accumulator):
    """Teacher sums from the block rows, which it then spoils (it spends them, like kl's)."""

    name = "test-spent-sums"
    buffered = True
    spends_rows = True

    def empty(self, c_t, c_s, device):
        return {"spent_sum_t": torch.zeros(c_t, dtype=torch.float64, device=device)}

    def add_block(self, state, work, block: Block):
        state["spent_sum_t"].add_(block.rows_t.double().sum(0) + block.k * block.offset_t)
        block.rows_t.fill_(float("nan"))
        block.rows_s.fill_(float("nan"))

    def merge(self, state, work, theirs, n, d_t, d_s):
        state["spent_sum_t"].add_(theirs["spent_sum_t"] + n * d_t)


def _inverse(distance):
    return 1.0 / (distance + EPS)


TEST_METRICS = (
    Metric("linf", "L∞",
           matrix=lambda a, b: _inverse(torch.cdist(a.T, b.T, p=float("inf"))),
           diagonal=lambda t, s: _inverse((t - s).abs().amax(0)),
           accumulators=(_LargestDifference(),),
           from_state=lambda st, n: _inverse(st["largest"])),
    # Reuses the moments of l2, cosine and correlation: the raw mean product.
    Metric("mean-product", "Mean product",
           matrix=lambda a, b: a.T @ b / a.shape[0],
           diagonal=lambda t, s: (t * s).mean(0),
           accumulators=(MOMENTS,),
           from_state=lambda st, n: (
               st["cross"] + torch.outer(st["shift_t"], st["sum_s"] + n * st["shift_s"])
               + torch.outer(st["sum_t"], st["shift_s"])) / n),
    Metric("teacher-mean", "Teacher mean",
           matrix=lambda a, b: a.mean(0)[:, None].expand(-1, b.shape[1]).clone(),
           diagonal=lambda t, s: t.mean(0),
           accumulators=(_SpentTeacherSums(),),
           from_state=lambda st, n: (st["spent_sum_t"] / n + st["shift_t"])[:, None]
           .expand(-1, st["shift_s"].shape[0]).clone()),
)


@pytest.fixture
def test_metrics(monkeypatch):
    """A test-local copy of the registry with TEST_METRICS added; METRICS itself is untouched."""
    registry = Registry(METRICS.kind)
    for name, metric in METRICS.items():
        registry.register(name, metric)
    for metric in TEST_METRICS:
        registry.register(metric.name, metric)
    monkeypatch.setattr(consistency, "METRICS", registry)
    return registry


@pytest.mark.parametrize("blocks", ["one block", "blocks of 8"])
def test_a_registered_metric_works_through_the_statistics(request, test_metrics, blocks):
    if blocks == "blocks of 8":
        request.getfixturevalue("small_blocks")
    a, b = features(mean=5.0, seed=16)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    names = [m.name for m in TEST_METRICS]
    builtin = ["kl", "correlation", "l1"]
    for name in names:
        direct = consistency_matrix(ta, tb, name)
        assert torch.equal(direct, test_metrics[name].matrix(ta, tb))
        diag = diagonal_consistency(ta[:, :C_S], tb, name)
        assert torch.allclose(diag, consistency_matrix(ta[:, :C_S], tb, name).diagonal())
    # Two accumulators spend the block rows (the test's and kl's), in either order.
    for metrics in (names + builtin, builtin[::-1] + names[::-1]):
        whole = stream(a, b, [N], metrics)
        for sizes in STREAM_SPLITS.values():
            stats = stream(a, b, sizes, metrics)
            for name in names:
                got = stats.matrix(name)
                np.testing.assert_allclose(got, consistency_matrix(ta, tb, name),
                                           rtol=1e-6, atol=1e-6, err_msg=name)
                np.testing.assert_allclose(got, whole.matrix(name), rtol=1e-9, atol=1e-12)
            for name in builtin:  # untouched by the added metrics
                alone = stream(a, b, sizes, [name])
                assert torch.equal(stats.matrix(name), alone.matrix(name)), name
    # Shared moments: mean-product adds no state to correlation's.
    shared = stream(a, b, [N], ["correlation", "mean-product"]).state_dict()["tensors"]
    assert shared.keys() == stream(a, b, [N], ["correlation"]).state_dict()["tensors"].keys()


def test_a_registered_metric_saves_loads_and_merges(test_metrics, tmp_path):
    a, b = features(mean=-4.0, seed=17)
    metrics = [m.name for m in TEST_METRICS] + ["kl"]
    first = stream(a[:20], b[:20], [3, 17], metrics)
    first.save(tmp_path / "first.pt")
    loaded = ConsistencyStatistics.load(tmp_path / "first.pt")
    second = stream(a[20:] + 1.5, b[20:] - 0.5, [40], metrics)  # another shift
    loaded.merge(second)
    a_all = np.concatenate([a[:20], a[20:] + 1.5])
    b_all = np.concatenate([b[:20], b[20:] - 0.5])
    for name in metrics:
        direct = consistency_matrix(torch.from_numpy(a_all), torch.from_numpy(b_all), name)
        if name == "kl":
            assert_close_to_direct(loaded.matrix(name), direct, name)
        else:
            np.testing.assert_allclose(loaded.matrix(name), direct, rtol=1e-6, atol=1e-6,
                                       err_msg=name)
    assert "linf" not in METRICS  # the module's registry never saw the test's metrics


def test_accumulator_names_and_state_entries_must_be_unique(monkeypatch):
    registry = Registry(METRICS.kind)
    impostor = _LargestDifference()
    registry.register("a", TEST_METRICS[0])
    registry.register("b", dataclasses.replace(TEST_METRICS[0], name="b", accumulators=(impostor,)))
    clash = _LargestDifference()
    clash.name = "another name"
    registry.register("c", dataclasses.replace(TEST_METRICS[0], name="c", accumulators=(clash,)))
    monkeypatch.setattr(consistency, "METRICS", registry)
    ConsistencyStatistics(2, 2, ["a"])
    with pytest.raises(KcdError, match="two different accumulators are named"):
        ConsistencyStatistics(2, 2, ["a", "b"])
    with pytest.raises(KcdError, match="reuses the state entries largest"):
        ConsistencyStatistics(2, 2, ["a", "c"])
    with pytest.raises(KcdError, match="names no accumulator"):
        Metric("none", "None", matrix=None, diagonal=None, accumulators=(), from_state=None)
