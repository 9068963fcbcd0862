"""Channel consistency between a teacher and a student (paper Section 3.2, Eq. 3-6).

Both networks see the same N samples; their feature maps are globally average-pooled, giving
``A(F_T)`` (N x c_T) and ``A(F_S)`` (N x c_S). Teacher channel ``i`` is the N-vector
``a_i = A(F_T)[:, i]``, student channel ``j`` is ``b_j = A(F_S)[:, j]``. The consistency matrix
``M`` (c_T x c_S) scores every pair; a larger ``M[i, j]`` means more consistent channels.

Metrics (:data:`METRICS`, a registry of :class:`Metric`):

``l1``, ``l2``
    ``M_ij = 1 / (||a_i - b_j||_p + EPS)`` (Eq. 3). The norm sums over the N samples; it is not
    a mean.
``correlation``
    Pearson correlation of ``a_i`` and ``b_j`` (Eq. 4). A constant channel has no defined
    correlation; it gets 0 with every channel.
``cosine``
    Cosine similarity of ``a_i`` and ``b_j``. An all-zero channel gets 0.
``kl``
    The paper names KL divergence without defining it. Our interpretation: each channel's N pooled
    activations become a distribution over the samples by a softmax over samples,
    ``p_i = softmax_n(a_ni)``, ``q_j = softmax_n(b_nj)``, and ``M_ij = 1 / (KL(p_i || q_j) + EPS)``,
    the inverse of a divergence like the L_p metrics. A softmax ignores a constant added to a
    channel, so ``kl`` ignores channel offsets.

The consistency score Γ of a channel map (Eq. 5/6) sums ``M`` over the matched pairs:
:func:`gamma`.

``M`` is computed either directly from features held in memory (:func:`consistency_matrix`) or
by streaming batches into a :class:`ConsistencyStatistics` accumulator whose memory does not grow
with N. :func:`diagonal_consistency` is the differentiable per-channel score used to train learned
transforms.

A :class:`Metric` holds everything about one metric: its name, its label in tables, its direct
formulas (all pairs, and pairs ``(j, j)`` only), the :class:`Accumulator` s of streaming sums it
reads and how it makes ``M`` from them. Accumulators are shared by name: metrics that read the
same sums (``l2``, ``cosine`` and ``correlation`` all read :data:`MOMENTS`) are accumulated once.
Adding a metric is one :class:`Metric` registered in :data:`METRICS` (with a new
:class:`Accumulator` only if no existing one holds the sums it needs), and its name and table
label in the torch-free :data:`kcd.naming.METRICS`, which the workflow's file names and the
tables read; on import this module checks that both registries name the same metrics.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from kcd import naming
from kcd.checkpoint import atomic_save, load_format
from kcd.errors import KcdError
from kcd.registry import Registry

EPS = 1e-8
"""Added to a distance or divergence before inverting it: identical channels score 1/EPS."""

_STATS_FORMAT = "kcd.consistency_statistics"
_L1_CHUNK_ELEMENTS = 1 << 20  # bound on the c_chunk x c_S float64 block of one cdist call
_BLOCK_ROWS = (512, 2048)  # bounds on the samples buffered before one block matrix product
_PIECE_ELEMENTS = 1 << 19  # bound on a piece x c float64 block of per-sample work
_PRODUCT_ELEMENTS = 1 << 20  # bound on the c_chunk x c_S float32 block of one matrix product


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def _inverse(distance: Tensor) -> Tensor:
    """Turn a non-negative distance or divergence into a consistency score."""
    return 1.0 / (distance + EPS)


def _ratio(cross: Tensor, sq_t: Tensor, sq_s: Tensor) -> Tensor:
    """``cross / sqrt(sq_t * sq_s)`` clipped to [-1, 1], and 0 where either norm is zero.

    The zero case is masked before the square root, so gradients stay finite.
    """
    product = sq_t * sq_s
    positive = product > 0
    ratio = cross / torch.sqrt(torch.where(positive, product, torch.ones_like(product)))
    return torch.where(positive, ratio, torch.zeros_like(ratio)).clamp(-1.0, 1.0)


def _normalize_(cross: Tensor, sq_t: Tensor, sq_s: Tensor) -> Tensor:
    """In place, ``cross[i, j] / sqrt(sq_t[i] sq_s[j])`` clipped to [-1, 1], 0 if a norm is 0.

    :func:`_ratio` for the streaming results (no gradients): one pass, no c_T x c_S temporaries.
    """
    inv_t = torch.where(sq_t > 0, sq_t.rsqrt(), torch.zeros_like(sq_t))
    inv_s = torch.where(sq_s > 0, sq_s.rsqrt(), torch.zeros_like(sq_s))
    return cross.mul_(inv_t[:, None]).mul_(inv_s[None, :]).clamp_(-1.0, 1.0)


def _channel_offset(x: Tensor) -> Tensor:
    """Per-channel mean of ``x`` (N x c), except that a constant channel gets its value exactly.

    Subtracting it centres the data and turns a constant channel into exact zeros (a float mean
    of equal values need not equal the value), so constant channels are recognised exactly.
    """
    return torch.where(x.amax(0) == x.amin(0), x[0], x.mean(0))


def _center(x: Tensor) -> Tensor:
    return x - _channel_offset(x)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable uninitialised work tensor of ``shape``, one per name, dtype, device and thread.

    Accumulators use it only inside one call, so all of a thread's accumulators share it; reusing
    it avoids allocating (and page-faulting) large temporaries on every batch.
    """
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    numel = math.prod(shape)
    flat = pool.get((name, dtype, device))
    if flat is None or flat.numel() < numel:
        flat = pool[(name, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def _rescale_rows(values: Tensor, log_factor: Tensor) -> Tensor:
    """Multiply ``values`` (c or c x k) by ``exp(log_factor)`` along its first axis, in place.

    Skipped when every factor is 1 (the running maximum did not move), the common case.
    """
    if bool((log_factor != 0).any()):
        factor = torch.exp(log_factor)
        values.mul_(factor if values.dim() == 1 else factor[:, None])
    return values


def _add_product(total: Tensor, a: Tensor, b: Tensor, row_scale: Tensor | None = None) -> None:
    """``total += row_scale[:, None] * aᵀb``: float32 products added in float64, by chunks of
    teacher channels (``a``: k x c_T, ``b``: k x c_S, ``total``: c_T x c_S)."""
    c_t, c_s = a.shape[1], b.shape[1]
    chunk = max(1, _PRODUCT_ELEMENTS // c_s)
    for start in range(0, c_t, chunk):
        rows = min(chunk, c_t - start)
        product = _scratch("product", (rows, c_s), torch.float32, a.device)
        torch.mm(a[:, start:start + rows].T, b, out=product)
        wide = _scratch("work", (rows, c_s), torch.float64, a.device).copy_(product)
        if row_scale is not None:
            wide.mul_(row_scale[start:start + rows, None])
        total[start:start + rows].add_(wide)


# --------------------------------------------------------------------------------------------
# Accumulators: streaming sums that metrics read
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A few samples of a batch, as :meth:`Accumulator.add_piece` sees them.

    ``a`` (k x c_T) and ``b`` (k x c_S) are the float64 samples minus the state's shifts (work
    tensors: read them, do not keep or change them); ``sum_t``, ``sum_s`` their column sums.
    """

    a: Tensor
    b: Tensor
    sum_t: Tensor
    sum_s: Tensor


@dataclass(frozen=True)
class Block:
    """A block of buffered samples, as :meth:`Accumulator.add_block` sees them.

    The ``k`` shifted samples (float64 ``a``, ``b`` of the pieces) are ``rows_t + offset_t`` and
    ``rows_s + offset_s``: float32 rows centred on the block (their spread within the block) and
    float64 offsets. ``mean_t``, ``mean_s`` are the exact float64 means of the shifted samples.
    The rows may be overwritten only by an accumulator with ``spends_rows``.
    """

    k: int
    rows_t: Tensor
    rows_s: Tensor
    mean_t: Tensor
    mean_s: Tensor
    offset_t: Tensor
    offset_s: Tensor


class Accumulator:
    """Streaming sums in a :class:`ConsistencyStatistics` state, read by one or more metrics.

    An accumulator is a stateless description: its tensors live in the statistics' ``state``
    (float64, saved by :meth:`ConsistencyStatistics.state_dict`; every key unique across
    accumulators) and, for values that are not saved, in its ``work`` dictionary. Metrics name the
    accumulators they read (:attr:`Metric.accumulators`); an accumulator needed by several metrics
    is kept once (accumulators are identified by :attr:`name`).

    The state also holds ``shift_t`` (c_T) and ``shift_s`` (c_S), the per-channel constant the
    statistics subtract from all samples (:func:`_channel_offset` of the first batch): sums of
    shifted samples are well conditioned when features have mean ≫ std.

    Feeding: a ``buffered`` accumulator sees every batch as pieces of a few shifted samples
    (:meth:`add_piece`, float64 per-channel work) and as blocks of buffered samples
    (:meth:`add_block`, float32 matrix products); :meth:`start_block` runs before a block's first
    piece. Every accumulator sees each whole batch, not shifted, in :meth:`add_batch`. Results
    must not depend on how the samples are split into batches (beyond float64 rounding).
    """

    name: str = ""
    buffered: bool = False
    """Whether it reads pieces and blocks (:meth:`add_piece`, :meth:`add_block`)."""
    spends_rows: bool = False
    """Whether :meth:`add_block` overwrites the block's rows (it then runs after the others)."""

    def empty(self, c_t: int, c_s: int, device: torch.device) -> dict[str, Tensor]:
        """The state entries of no samples (float64 tensors on ``device``)."""
        raise NotImplementedError

    def workspace(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Values kept between calls but not saved, derived from a fresh, loaded or merged state."""
        return {}

    def start_block(self, work: dict[str, Tensor]) -> None:
        """A new block of samples starts."""

    def add_piece(self, state: dict[str, Tensor], work: dict[str, Tensor], piece: Piece) -> None:
        """Add per-channel statistics of a few samples."""

    def add_block(self, state: dict[str, Tensor], work: dict[str, Tensor], block: Block) -> None:
        """Add the matrix statistics of a block of buffered samples."""

    def add_batch(self, state: dict[str, Tensor], x_t: Tensor, x_s: Tensor) -> None:
        """Add a whole batch of pooled features (b x c_T, b x c_S; not shifted, any float dtype)."""

    def merge(self, state: dict[str, Tensor], work: dict[str, Tensor],
              theirs: dict[str, Tensor], n: int, d_t: Tensor, d_s: Tensor) -> None:
        """Add ``theirs``, the state of ``n`` other samples (not empty), into ``state``.

        ``d_t``, ``d_s``: their shifts minus ours (their sums are of samples minus their shifts).
        Called with the block buffers of both sides multiplied in.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.name}'>"


def _zeros(device: torch.device, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64, device=device)


class _Moments(Accumulator):
    """First and second moments and the cross product ``sum_n a_ni b_nj`` of the shifted samples.

    ``sum_t``, ``sq_t`` (c_T), ``sum_s``, ``sq_s`` (c_S) per piece in float64; ``cross``
    (c_T x c_S) per block of ``k`` samples: its centred product, one float32 matrix product
    ``XᵀY`` of its samples minus their block mean, plus ``k d_t d_sᵀ`` for its exact float64 block
    means ``d`` (the pairwise co-moment update of Chan et al.). So the float32 rounding scales with
    the spread within a block, not with how far the block means lie from the shift, and the result
    does not depend on the batch sizes (a 1-sample first batch, class-sorted batches) beyond
    float64 rounding. The float32 products limit the precision of an L2 distance between
    near-identical channels to ~1e-7 of the channel norms, and of a correlation or cosine to
    ~1e-7..5e-7 absolute for a few hundred samples in one block (at N=50k, c=256 the largest errors
    against float64 are ~2e-8 for correlation/cosine, ~1e-8 relative for l2).
    """

    name = "moments"
    buffered = True

    def empty(self, c_t: int, c_s: int, device: torch.device) -> dict[str, Tensor]:
        return dict(sum_t=_zeros(device, c_t), sum_s=_zeros(device, c_s),
                    sq_t=_zeros(device, c_t), sq_s=_zeros(device, c_s),
                    cross=_zeros(device, c_t, c_s))

    def add_piece(self, state: dict[str, Tensor], work: dict[str, Tensor], piece: Piece) -> None:
        state["sum_t"].add_(piece.sum_t)
        state["sum_s"].add_(piece.sum_s)
        for x, squares in ((piece.a, "sq_t"), (piece.b, "sq_s")):
            scratch = _scratch("work", tuple(x.shape), torch.float64, x.device)
            state[squares].add_(torch.mul(x, x, out=scratch).sum(0))

    def add_block(self, state: dict[str, Tensor], work: dict[str, Tensor], block: Block) -> None:
        _add_product(state["cross"], block.rows_t, block.rows_s)
        state["cross"].addr_(block.mean_t, block.mean_s, alpha=block.k)

    def merge(self, state: dict[str, Tensor], work: dict[str, Tensor],
              theirs: dict[str, Tensor], n: int, d_t: Tensor, d_s: Tensor) -> None:
        state["sum_t"].add_(theirs["sum_t"] + n * d_t)
        state["sum_s"].add_(theirs["sum_s"] + n * d_s)
        state["sq_t"].add_(theirs["sq_t"] + 2 * d_t * theirs["sum_t"] + n * d_t * d_t)
        state["sq_s"].add_(theirs["sq_s"] + 2 * d_s * theirs["sum_s"] + n * d_s * d_s)
        state["cross"].add_(
            theirs["cross"]
            + torch.outer(d_t, theirs["sum_s"])
            + torch.outer(theirs["sum_t"], d_s)
            + n * torch.outer(d_t, d_s)
        )


class _SoftmaxSums(Accumulator):
    """Streaming log-sum-exp sums of the softmax over samples (a softmax is shift invariant).

    For teacher channel i the running maximum ``max_t`` (``m_i``), ``z_t`` (``Z_i = sum_n
    exp(a_ni - m_i)``) and ``u_t`` (``U_i = sum_n exp(a_ni - m_i) a_ni``); for student channel j
    ``max_s`` (``m'_j``) and ``z_s`` (``Z'_j``), all float64 per piece; and ``v``
    (``V_ij = sum_n exp(a_ni - m_i) b_nj``): one float32 matrix product per block on its centred
    samples, their offset added with the block's float64 Z (``block_z``), its rows rescaled in
    float64 when a maximum grows (``v_max``: the maxima that V is expressed against, equal to
    ``max_t`` after every block). Errors against float64 at N=50k, c=256: ~3e-8 relative.
    """

    name = "softmax"
    buffered = True
    spends_rows = True  # the teacher rows become the softmax weights

    def empty(self, c_t: int, c_s: int, device: torch.device) -> dict[str, Tensor]:
        return dict(max_t=_zeros(device, c_t) - math.inf, z_t=_zeros(device, c_t),
                    u_t=_zeros(device, c_t), max_s=_zeros(device, c_s) - math.inf,
                    z_s=_zeros(device, c_s), v=_zeros(device, c_t, c_s))

    def workspace(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"block_z": torch.zeros_like(state["z_t"]), "v_max": state["max_t"].clone()}

    def start_block(self, work: dict[str, Tensor]) -> None:
        work["block_z"].zero_()

    def add_piece(self, state: dict[str, Tensor], work: dict[str, Tensor], piece: Piece) -> None:
        for x, top, zs, u in ((piece.a, "max_t", (state["z_t"], work["block_z"]), state["u_t"]),
                              (piece.b, "max_s", (state["z_s"],), None)):
            new = torch.maximum(state[top], x.amax(0))
            for total in zs if u is None else (*zs, u):
                _rescale_rows(total, state[top] - new)
            state[top].copy_(new)
            weights = _scratch("work", tuple(x.shape), torch.float64, x.device)
            torch.sub(x, new, out=weights).exp_()
            z = weights.sum(0)
            for total in zs:
                total.add_(z)
            if u is not None:
                u.add_(weights.mul_(x).sum(0))

    def add_block(self, state: dict[str, Tensor], work: dict[str, Tensor], block: Block) -> None:
        top = state["max_t"]
        _rescale_rows(state["v"], work["v_max"] - top)
        # The rows stand for the shifted samples minus o: a + o_t = x_t - shift_t. Weights
        # exp(a + o_t - m) are float32 exp(a - fl(m - o_t)) (about <= 1) times the float64
        # factor exp(fl(m - o_t) - (m - o_t)) that puts them against the exact maxima m.
        # Then V += sum_n w (b + o_s) = wᵀb + Z o_sᵀ, with the block's exact float64 Z.
        limit = top - block.offset_t
        limit32 = limit.float()
        weights = block.rows_t.sub_(limit32).exp_()  # the rows are spent: now the weights
        _add_product(state["v"], weights, block.rows_s,
                     row_scale=torch.exp(limit32.double() - limit))
        state["v"].addr_(work["block_z"], block.offset_s)
        work["v_max"].copy_(top)

    def merge(self, state: dict[str, Tensor], work: dict[str, Tensor],
              theirs: dict[str, Tensor], n: int, d_t: Tensor, d_s: Tensor) -> None:
        # Their sums in our shift, then both against the larger maxima.
        max_t, z_t = theirs["max_t"] + d_t, theirs["z_t"].clone()
        u_t = theirs["u_t"] + d_t * theirs["z_t"]
        max_s, z_s = theirs["max_s"] + d_s, theirs["z_s"].clone()
        v = theirs["v"] + torch.outer(theirs["z_t"], d_s)
        new_t, new_s = torch.maximum(state["max_t"], max_t), torch.maximum(state["max_s"], max_s)
        for key in ("z_t", "u_t", "v"):
            _rescale_rows(state[key], state["max_t"] - new_t)
        _rescale_rows(state["z_s"], state["max_s"] - new_s)
        incoming_t = max_t - new_t
        state["z_t"].add_(_rescale_rows(z_t, incoming_t))
        state["u_t"].add_(_rescale_rows(u_t, incoming_t))
        state["v"].add_(_rescale_rows(v, incoming_t))
        state["z_s"].add_(_rescale_rows(z_s, max_s - new_s))
        state["max_t"].copy_(new_t)
        state["max_s"].copy_(new_s)
        work["v_max"].copy_(new_t)


class _AbsoluteDifferences(Accumulator):
    """``l1`` (c_T x c_S): ``sum_n |a_ni - b_nj|``, exact.

    No sufficient statistic exists, so it is accumulated with float64 ``torch.cdist(p=1)`` per
    batch, in chunks of teacher channels that bound the temporary memory. Costs O(N c_T c_S) like
    the moments' matmul but runs about 20 times slower, since ``|x - y|`` has no fast
    matrix-product kernel.
    """

    name = "l1"

    def empty(self, c_t: int, c_s: int, device: torch.device) -> dict[str, Tensor]:
        return {"l1": _zeros(device, c_t, c_s)}

    def add_batch(self, state: dict[str, Tensor], x_t: Tensor, x_s: Tensor) -> None:
        a_channels, b_channels = x_t.double().T.contiguous(), x_s.double().T.contiguous()
        c_t, c_s = a_channels.shape[0], b_channels.shape[0]
        chunk = max(1, _L1_CHUNK_ELEMENTS // c_s)
        for start in range(0, c_t, chunk):
            state["l1"][start:start + chunk].add_(
                torch.cdist(a_channels[start:start + chunk], b_channels, p=1)
            )

    def merge(self, state: dict[str, Tensor], work: dict[str, Tensor],
              theirs: dict[str, Tensor], n: int, d_t: Tensor, d_s: Tensor) -> None:
        state["l1"].add_(theirs["l1"])


MOMENTS: Accumulator = _Moments()
SOFTMAX_SUMS: Accumulator = _SoftmaxSums()
ABSOLUTE_DIFFERENCES: Accumulator = _AbsoluteDifferences()


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One consistency metric: all that the direct and the streaming computations need of it.

    ``matrix(a, b)``
        ``M`` (c_T x c_S) of float64 features in memory, ``a``: N x c_T, ``b``: N x c_S.
    ``diagonal(t, s)``
        ``M[j, j]`` of the pairs ``(t[:, j], s[:, j])`` (N x c each): differentiable, with
        finite gradients, in the inputs' dtype.
    ``accumulators``
        The :class:`Accumulator` s of streaming sums it reads.
    ``from_state(state, n)``
        ``M`` (float64, on the state's device) from a :class:`ConsistencyStatistics` state of
        ``n > 0`` samples: its accumulators' entries and ``shift_t``, ``shift_s``. It may change
        nothing in ``state``.
    """

    name: str
    label: str  # the metric's name in tables (Table 2): kcd.naming's label for it
    matrix: Callable[[Tensor, Tensor], Tensor]
    diagonal: Callable[[Tensor, Tensor], Tensor]
    accumulators: tuple[Accumulator, ...]
    from_state: Callable[[dict[str, Tensor], int], Tensor]

    def __post_init__(self) -> None:
        if not self.accumulators:
            raise KcdError(f"consistency metric '{self.name}' names no accumulator")


METRICS: Registry[Metric] = Registry("consistency metric")
"""The consistency metrics by name; iterating gives the names in registration order."""


def _register(metric: Metric) -> Metric:
    return METRICS.register(metric.name, metric)


def _label(name: str) -> str:
    """The table label of a metric, from :data:`kcd.naming.METRICS`."""
    return naming.METRICS.get(name)


def metric_names() -> tuple[str, ...]:
    """Names of the registered metrics: ``("l1", "l2", "correlation", "cosine", "kl")``."""
    return tuple(METRICS.names())


# ---- l1, l2 (Eq. 3) ---------------------------------------------------------------------------


def _lp_matrix(p: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda a, b: _inverse(
        torch.cdist(a.T, b.T, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    )


def _lp_diagonal(p: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda t, s: _inverse(torch.linalg.vector_norm(t - s, ord=p, dim=0))


def _l1_from_state(st: dict[str, Tensor], n: int) -> Tensor:
    return st["l1"].add(EPS).reciprocal_()


def _l2_from_state(st: dict[str, Tensor], n: int) -> Tensor:
    # ||a - b||² = ||a' - b'||² + δ (2 sum(a' - b') + n δ) for the shifted a', b' and
    # δ = shift_t - shift_s. In-place arithmetic on few c_T x c_S temporaries: they can be large.
    delta = st["shift_t"][:, None] - st["shift_s"][None, :]
    result = torch.sub(st["sum_t"][:, None], st["sum_s"][None, :]).mul_(2)
    result.add_(delta, alpha=n).mul_(delta)
    result.add_(st["sq_t"][:, None]).add_(st["sq_s"][None, :])
    result.add_(st["cross"], alpha=-2)
    return result.clamp_min_(0.0).sqrt_().add_(EPS).reciprocal_()


_register(Metric("l1", _label("l1"), matrix=_lp_matrix(1.0), diagonal=_lp_diagonal(1.0),
                 accumulators=(ABSOLUTE_DIFFERENCES,), from_state=_l1_from_state))
_register(Metric("l2", _label("l2"), matrix=_lp_matrix(2.0), diagonal=_lp_diagonal(2.0),
                 accumulators=(MOMENTS,), from_state=_l2_from_state))


# ---- correlation (Eq. 4) and cosine --------------------------------------------------------


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    return _ratio(a.T @ b, (a * a).sum(0)[:, None], (b * b).sum(0)[None, :])


def _cosine_diagonal(t: Tensor, s: Tensor) -> Tensor:
    return _ratio((t * s).sum(0), (t * t).sum(0), (s * s).sum(0))


def _correlation_from_state(st: dict[str, Tensor], n: int) -> Tensor:
    result = torch.outer(st["sum_t"], st["sum_s"]).div_(-n).add_(st["cross"])  # covariance
    var_t = (st["sq_t"] - st["sum_t"] ** 2 / n).clamp_min(0.0)
    var_s = (st["sq_s"] - st["sum_s"] ** 2 / n).clamp_min(0.0)
    return _normalize_(result, var_t, var_s)


def _cosine_from_state(st: dict[str, Tensor], n: int) -> Tensor:
    # Raw sums from shifted ones: a = a' + shift_t, b = b' + shift_s, so
    # dot = cross + shift_t (sum_s + n shift_s)ᵀ + sum_t shift_sᵀ.
    shift_t, shift_s = st["shift_t"], st["shift_s"]
    result = torch.outer(shift_t, st["sum_s"] + n * shift_s).add_(st["cross"])
    result.addr_(st["sum_t"], shift_s)
    sq_t = st["sq_t"] + 2 * shift_t * st["sum_t"] + n * shift_t ** 2
    sq_s = st["sq_s"] + 2 * shift_s * st["sum_s"] + n * shift_s ** 2
    return _normalize_(result, sq_t, sq_s)


_register(Metric("correlation", _label("correlation"),
                 matrix=lambda a, b: _cosine_matrix(_center(a), _center(b)),
                 diagonal=lambda t, s: _cosine_diagonal(_center(t), _center(s)),
                 accumulators=(MOMENTS,), from_state=_correlation_from_state))
_register(Metric("cosine", _label("cosine"), matrix=_cosine_matrix, diagonal=_cosine_diagonal,
                 accumulators=(MOMENTS,), from_state=_cosine_from_state))


# ---- kl ----------------------------------------------------------------------------------------


def _kl_matrix(a: Tensor, b: Tensor) -> Tensor:
    log_p, log_q = torch.log_softmax(a, dim=0), torch.log_softmax(b, dim=0)
    p = log_p.exp()
    kl = (p * log_p).sum(0)[:, None] - p.T @ log_q
    return _inverse(kl.clamp_min(0.0))


def _kl_diagonal(t: Tensor, s: Tensor) -> Tensor:
    log_p, log_q = torch.log_softmax(t, dim=0), torch.log_softmax(s, dim=0)
    return _inverse((log_p.exp() * (log_p - log_q)).sum(0).clamp_min(0.0))


def _kl_from_state(st: dict[str, Tensor], n: int) -> Tensor:
    # KL_ij = (U_i - V_ij) / Z_i - (m_i + log Z_i) + (m'_j + log Z'_j)
    log_norm_t = st["max_t"] + torch.log(st["z_t"])
    log_norm_s = st["max_s"] + torch.log(st["z_s"])
    result = torch.sub(st["u_t"][:, None], st["v"]).div_(st["z_t"][:, None])
    result.sub_(log_norm_t[:, None]).add_(log_norm_s[None, :])
    return result.clamp_min_(0.0).add_(EPS).reciprocal_()


_register(Metric("kl", _label("kl"), matrix=_kl_matrix, diagonal=_kl_diagonal,
                 accumulators=(SOFTMAX_SUMS,), from_state=_kl_from_state))

naming.check_implemented("metric", naming.METRICS, METRICS.names(), "kcd/consistency.py")


# --------------------------------------------------------------------------------------------
# Direct computation
# --------------------------------------------------------------------------------------------


def _check_metric(metric: str) -> str:
    METRICS.get(metric)
    return metric


def _check_pair(feat_t: Any, feat_s: Any) -> tuple[Tensor, Tensor]:
    """Validate pooled teacher/student features (N x c each, same N, finite) and return tensors."""
    checked = []
    for side, feat in (("teacher", feat_t), ("student", feat_s)):
        x = torch.as_tensor(feat)
        if x.dim() != 2:
            raise KcdError(
                f"{side} features must be pooled 2-D (N samples x channels), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise KcdError(f"{side} features hold no samples (N=0)")
        checked.append(x)
    x_t, x_s = checked
    if x_t.shape[0] != x_s.shape[0]:
        raise KcdError(
            f"teacher has N={x_t.shape[0]} samples but student has N={x_s.shape[0]}; "
            "pool features of the same samples from both networks"
        )
    for side, x in (("teacher", x_t), ("student", x_s)):
        # A NaN or inf makes the sum non-finite; only then (or on overflow) look at every value.
        with torch.no_grad():
            if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
                raise KcdError(f"{side} features contain NaN or inf values")
    return x_t, x_s


def consistency_matrix(feat_t: Tensor, feat_s: Tensor, metric: str) -> Tensor:
    """Consistency matrix ``M`` (c_T x c_S, float64, on the CPU) of features held in memory.

    ``feat_t`` is ``A(F_T)`` (N x c_T), ``feat_s`` is ``A(F_S)`` (N x c_S) over the same samples.
    Computed directly in float64; for many samples stream them into :class:`ConsistencyStatistics`.
    """
    formula = METRICS.get(metric)
    a, b = _check_pair(feat_t, feat_s)
    return formula.matrix(a.double(), b.double()).cpu()


def diagonal_consistency(t: Tensor, s: Tensor, metric: str) -> Tensor:
    """Per-channel consistency ``M[j, j]`` between ``t[:, j]`` and ``s[:, j]`` (N x c each).

    Differentiable and in the inputs' dtype: the score a learned transform maximises. Inputs must be
    finite pooled features with equal shapes.
    """
    formula = METRICS.get(metric)
    a, b = _check_pair(t, s)
    if a.shape != b.shape:
        raise KcdError(
            f"diagonal consistency needs equal channel counts, got {a.shape[1]} and {b.shape[1]}"
        )
    return formula.diagonal(a, b)


def gamma(matrix: Tensor, channel_map: Tensor) -> float:
    """Consistency score Γ (Eq. 5/6) of a channel map: ``sum_j M[channel_map[j], j]``.

    ``channel_map[j]`` is the teacher channel given to student channel ``j``; for the identity map
    on a square ``M`` this is the trace.
    """
    m = torch.as_tensor(matrix)
    index = torch.as_tensor(channel_map, dtype=torch.long)
    if m.dim() != 2 or index.dim() != 1 or index.shape[0] != m.shape[1]:
        raise KcdError(
            f"channel map of shape {tuple(index.shape)} does not fit a consistency matrix of shape "
            f"{tuple(m.shape)}; it needs one teacher channel per student channel"
        )
    if index.numel() and (index.min() < 0 or index.max() >= m.shape[0]):
        raise KcdError(f"channel map holds teacher channels outside 0..{m.shape[0] - 1}")
    return float(m[index, torch.arange(m.shape[1])].double().sum())


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


def _accumulators_of(metrics: Iterable[str]) -> tuple[Accumulator, ...]:
    """The accumulators the metrics read, each once, in the order they are fed.

    Buffered ones come first, those that spend the block's rows last among them (stable
    otherwise).
    """
    found: dict[str, Accumulator] = {}
    for metric in metrics:
        for accumulator in METRICS.get(metric).accumulators:
            if found.setdefault(accumulator.name, accumulator) is not accumulator:
                raise KcdError(
                    f"two different accumulators are named '{accumulator.name}' (metric "
                    f"'{metric}'); an accumulator's name must identify it"
                )
    return tuple(sorted(found.values(), key=lambda acc: (not acc.buffered, acc.spends_rows)))


class ConsistencyStatistics:
    """Streaming accumulator of consistency matrices of pooled features; memory independent of N.

    Feed batches of pooled teacher/student features with :meth:`update`; read ``M`` with
    :meth:`matrix`. Two accumulators over disjoint batches combine with :meth:`merge`.
    Only the statistics the requested ``metrics`` need are kept: the :class:`Accumulator` s they
    name (:attr:`Metric.accumulators`), each once, all float64:

    * :data:`MOMENTS` (``l2``, ``cosine``, ``correlation``): per-channel first and second moments
      and the cross product of the shifted samples;
    * :data:`SOFTMAX_SUMS` (``kl``): a streaming log-sum-exp per channel and the softmax-weighted
      cross sum;
    * :data:`ABSOLUTE_DIFFERENCES` (``l1``): ``sum_n |a_ni - b_nj|``, exact.

    All sums are of data shifted by a per-channel constant (the first batch's mean, see
    :func:`_channel_offset`), which keeps them well conditioned when features have mean ≫ std.
    Matrix sums are added per block of ``k`` samples (see Memory) as float32 matrix products of the
    samples centred on their block's float64 mean, plus float64 terms of the block means. So the
    float32 rounding scales with the spread within a block, and the result does not depend on the
    batch sizes beyond float64 rounding. Every metric is derived from the sums in float64.

    Memory: the state (``c_T x c_S`` float64 per matrix statistic, vectors otherwise) plus, for
    buffered accumulators (every metric but ``l1``), a buffer of the samples not yet multiplied
    (float32, ``rows x (c_T + c_S)``; :attr:`workspace_bytes`). It grows with the samples up to one
    block of ``4 c_T c_S / (c_T + c_S)`` rows clamped to 512..2048 (``_BLOCK_ROWS``): at most two
    ``c_T x c_S`` float64 matrices' worth beyond 512 rows, e.g. 32 MiB for ``c_T = c_S = 2048``
    beside a 64 MiB state. Work tensors for blocks of samples and of products (bounded by
    ``_PIECE_ELEMENTS`` and ``_PRODUCT_ELEMENTS``, 20 MiB at c=2048) are shared by all
    accumulators of a thread. Nothing grows with N. The buffer is multiplied in when the block is
    full and before :meth:`matrix`, :meth:`state_dict` and :meth:`merge`, so results always cover
    every sample given to :meth:`update`; blocks start every block length of samples, whatever the
    batch sizes, until a read multiplies in a partial block.

    The state lives on ``device``; :meth:`matrix` returns float64 CPU tensors.
    """

    def __init__(
        self,
        c_t: int,
        c_s: int,
        metrics: Iterable[str] = METRICS,
        device: str | torch.device = "cpu",
    ) -> None:
        if isinstance(metrics, str):
            metrics = (metrics,)
        self.metrics: tuple[str, ...] = tuple(dict.fromkeys(_check_metric(m) for m in metrics))
        if not self.metrics:
            raise KcdError(f"no metric requested; accepted: {', '.join(METRICS)}")
        for name, count in (("c_t", c_t), ("c_s", c_s)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise KcdError(f"{name} must be a positive channel count, got {count!r}")
        self.c_t, self.c_s = c_t, c_s
        self.device = torch.device(device)
        self.n = 0
        self._accumulators = _accumulators_of(self.metrics)
        self._buffered = tuple(acc for acc in self._accumulators if acc.buffered)
        self._state = self._empty_state()
        self._work = self._workspaces()
        # Samples waiting for the next block product, rows [0, _fill): float32 shifted features
        # minus the block's reference _ref (its first one). _block_sum: float64 sum of the
        # block's shifted samples (see _flush).
        self._rows_t: Tensor | None = None
        self._rows_s: Tensor | None = None
        self._fill = 0
        vector = dict(dtype=torch.float64, device=self.device)
        self._ref_t, self._ref_s = torch.zeros(c_t, **vector), torch.zeros(c_s, **vector)
        self._block_sum_t = torch.zeros(c_t, **vector)
        self._block_sum_s = torch.zeros(c_s, **vector)
        # Block length: 2 c_T c_S / (c_T + c_S) * 2 rows keeps the buffer within two c_T x c_S
        # float64 matrices; 512..2048 rows make the float64 additions of the products cheap.
        self._block_rows = min(_BLOCK_ROWS[1],
                               max(_BLOCK_ROWS[0], 4 * c_t * c_s // (c_t + c_s)))

    # ---- state layout ---------------------------------------------------------------------

    @property
    def workspace_bytes(self) -> int:
        """Bytes of this accumulator's sample buffer (not counting the state); bounded, not ∝ N."""
        return sum(t.numel() * t.element_size() for t in (self._rows_t, self._rows_s)
                   if t is not None)

    def _empty_state(self) -> dict[str, Tensor]:
        state = {"shift_t": _zeros(self.device, self.c_t), "shift_s": _zeros(self.device, self.c_s)}
        for accumulator in self._accumulators:
            entries = accumulator.empty(self.c_t, self.c_s, self.device)
            clash = sorted(state.keys() & entries.keys())
            if clash:
                raise KcdError(f"accumulator '{accumulator.name}' reuses the state entries "
                               f"{', '.join(clash)}")
            state.update(entries)
        return state

    def _workspaces(self) -> dict[str, dict[str, Tensor]]:
        """Each accumulator's unsaved values, from the current state."""
        return {acc.name: acc.workspace(self._state) for acc in self._accumulators}

    # ---- accumulation ---------------------------------------------------------------------

    @torch.no_grad()
    def update(self, pooled_t: Tensor, pooled_s: Tensor) -> None:
        """Add one batch: ``pooled_t`` (b x c_T) and ``pooled_s`` (b x c_S) of the same samples."""
        x_t, x_s = _check_pair(pooled_t, pooled_s)
        for side, x, count in (("teacher", x_t, self.c_t), ("student", x_s, self.c_s)):
            if x.shape[1] != count:
                raise KcdError(
                    f"{side} batch has {x.shape[1]} channels but this accumulator expects "
                    f"c_{side[0].upper()}={count}"
                )
        x_t, x_s = x_t.detach().to(self.device), x_s.detach().to(self.device)
        st = self._state
        if self.n == 0:
            st["shift_t"].copy_(_channel_offset(x_t.double()))
            st["shift_s"].copy_(_channel_offset(x_s.double()))
        if self._buffered:
            rows = x_t.shape[0]
            block = self._block_rows
            piece = max(1, min(block, _PIECE_ELEMENTS // max(self.c_t, self.c_s)))
            start = 0
            while start < rows:
                k = min(piece, rows - start, block - self._fill)
                self._add_piece(x_t[start:start + k], x_s[start:start + k])
                start += k
                if self._fill == block:
                    self._flush()
        for accumulator in self._accumulators:
            accumulator.add_batch(st, x_t, x_s)
        self.n += x_t.shape[0]

    def _add_piece(self, x_t: Tensor, x_s: Tensor) -> None:
        """Per-channel float64 statistics of a few samples; buffer them for the block product.

        The buffer holds the shifted samples minus the block's reference, its first sample: values
        of the spread within the block whatever the shift, so rounding them to float32 loses little.
        """
        st, k = self._state, x_t.shape[0]
        a = _scratch("a", (k, self.c_t), torch.float64, self.device)
        b = _scratch("b", (k, self.c_s), torch.float64, self.device)
        a.copy_(x_t).sub_(st["shift_t"])
        b.copy_(x_s).sub_(st["shift_s"])
        if self._fill == 0:  # a new block
            self._ref_t.copy_(a[0])
            self._ref_s.copy_(b[0])
            self._block_sum_t.zero_()
            self._block_sum_s.zero_()
            for accumulator in self._buffered:
                accumulator.start_block(self._work[accumulator.name])
        sum_t, sum_s = a.sum(0), b.sum(0)
        self._block_sum_t.add_(sum_t)
        self._block_sum_s.add_(sum_s)
        piece = Piece(a=a, b=b, sum_t=sum_t, sum_s=sum_s)
        for accumulator in self._buffered:
            accumulator.add_piece(st, self._work[accumulator.name], piece)
        self._reserve(self._fill + k)
        torch.sub(a, self._ref_t, out=self._rows_t[self._fill:self._fill + k])
        torch.sub(b, self._ref_s, out=self._rows_s[self._fill:self._fill + k])
        self._fill += k

    def _reserve(self, rows: int) -> None:
        """Grow the sample buffer (doubling, up to the block length) to hold ``rows`` samples."""
        held = 0 if self._rows_t is None else self._rows_t.shape[0]
        if rows <= held:
            return
        size = min(self._block_rows, max(rows, 2 * held, 64))
        grown = []
        for old, count in ((self._rows_t, self.c_t), (self._rows_s, self.c_s)):
            new = torch.empty(size, count, dtype=torch.float32, device=self.device)
            if old is not None:
                new[:self._fill].copy_(old[:self._fill])
            grown.append(new)
        self._rows_t, self._rows_s = grown

    def _flush(self) -> None:
        """Multiply the buffered samples into the matrix sums and empty the buffer.

        The rows are first centred on their block mean (exact in float64 from the block sums,
        subtracted in float32), so the float32 products see only the spread within the block; the
        accumulators add the float64 terms of the block means. The float32 rows do not depend on
        the shift (beyond float64 rounding), which enters only float64 terms: the result does not
        depend on how the samples were batched.
        """
        k = self._fill
        if k == 0:
            return
        a, b = self._rows_t[:k], self._rows_s[:k]
        mean_t, mean_s = self._block_sum_t / k, self._block_sum_s / k  # of the shifted samples
        center_t, center_s = (mean_t - self._ref_t).float(), (mean_s - self._ref_s).float()
        a.sub_(center_t)
        b.sub_(center_s)
        block = Block(k=k, rows_t=a, rows_s=b, mean_t=mean_t, mean_s=mean_s,
                      offset_t=self._ref_t + center_t.double(),
                      offset_s=self._ref_s + center_s.double())
        last = len(self._buffered) - 1
        for i, accumulator in enumerate(self._buffered):
            seen = block
            if accumulator.spends_rows and i < last:  # a later one still reads the rows
                seen = dataclasses.replace(
                    block,
                    rows_t=_scratch("spent_t", tuple(a.shape), a.dtype, a.device).copy_(a),
                    rows_s=_scratch("spent_s", tuple(b.shape), b.dtype, b.device).copy_(b),
                )
            accumulator.add_block(self._state, self._work[accumulator.name], seen)
        self._fill = 0

    @torch.no_grad()
    def merge(self, other: ConsistencyStatistics) -> None:
        """Add the statistics of ``other`` (collected over other samples) into this accumulator.

        The result equals one accumulator fed all batches of both: ``other``'s sums are
        re-expressed exactly (float64 algebra) in this accumulator's shift.
        """
        if not isinstance(other, ConsistencyStatistics):
            raise KcdError(f"can only merge ConsistencyStatistics, got {type(other).__name__}")
        same_channels = (other.c_t, other.c_s) == (self.c_t, self.c_s)
        if not same_channels or set(other.metrics) != set(self.metrics):
            raise KcdError(
                f"cannot merge statistics of c_T={other.c_t}, c_S={other.c_s}, metrics "
                f"{', '.join(other.metrics)} into c_T={self.c_t}, c_S={self.c_s}, metrics "
                f"{', '.join(self.metrics)}"
            )
        if other.n == 0:
            return
        self._flush()
        other._flush()
        theirs = {key: value.to(self.device) for key, value in other._state.items()}
        if self.n == 0:
            self._state = {key: value.clone() for key, value in theirs.items()}
            self.n = other.n
            self._work = self._workspaces()
            return
        st, n = self._state, other.n
        d_t, d_s = theirs["shift_t"] - st["shift_t"], theirs["shift_s"] - st["shift_s"]
        for accumulator in self._accumulators:
            accumulator.merge(st, self._work[accumulator.name], theirs, n, d_t, d_s)
        self.n += n

    # ---- results --------------------------------------------------------------------------

    @torch.no_grad()
    def matrix(self, metric: str) -> Tensor:
        """Consistency matrix ``M`` (c_T x c_S, float64, CPU) of all samples seen so far."""
        _check_metric(metric)
        if metric not in self.metrics:
            raise KcdError(
                f"metric '{metric}' was not accumulated (this accumulator has: "
                f"{', '.join(self.metrics)}); create ConsistencyStatistics with it in metrics"
            )
        if self.n == 0:
            raise KcdError("no samples accumulated yet; call update() with pooled features first")
        self._flush()
        return METRICS.get(metric).from_state(self._state, self.n).cpu()

    # ---- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A plain dictionary (tensors, str, int) that ``torch.load(weights_only=True)`` reads.

        Buffered samples are multiplied in first, so the state covers every sample seen.
        """
        self._flush()
        return {
            "format": _STATS_FORMAT,
            "c_t": self.c_t,
            "c_s": self.c_s,
            "metrics": list(self.metrics),
            "n": self.n,
            "tensors": {key: value.cpu().clone() for key, value in self._state.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of an accumulator with the same channels and metrics."""
        if not isinstance(state, dict) or state.get("format") != _STATS_FORMAT:
            raise KcdError("not a ConsistencyStatistics state dictionary")
        found = (state.get("c_t"), state.get("c_s"), tuple(state.get("metrics", ())))
        if found != (self.c_t, self.c_s, self.metrics):
            raise KcdError(
                f"state of c_T={found[0]}, c_S={found[1]}, metrics {', '.join(found[2])} does not "
                f"fit c_T={self.c_t}, c_S={self.c_s}, metrics {', '.join(self.metrics)}"
            )
        tensors = state.get("tensors", {})
        if set(tensors) != set(self._state) or any(
            tensors[key].shape != value.shape for key, value in self._state.items()
        ):
            raise KcdError("state dictionary holds the wrong statistics for these metrics")
        self._state = {key: tensors[key].to(self.device, torch.float64) for key in self._state}
        self.n = int(state["n"])
        self._fill = 0  # the loaded state replaces any buffered samples
        self._work = self._workspaces()

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to ``path`` atomically (readable with ``weights_only=True``)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> ConsistencyStatistics:
        """Read statistics written by :meth:`save`."""
        state = load_format(path, _STATS_FORMAT)
        try:
            return cls.from_state_dict(state, device=device)
        except (KeyError, TypeError, KcdError) as exc:
            raise KcdError(f"{path} is not a valid {_STATS_FORMAT} file: {exc}") from None

    @classmethod
    def from_state_dict(
        cls, state: dict, device: str | torch.device = "cpu"
    ) -> ConsistencyStatistics:
        """An accumulator restored from a :meth:`state_dict`."""
        stats = cls(state["c_t"], state["c_s"], state["metrics"], device=device)
        stats.load_state_dict(state)
        return stats
