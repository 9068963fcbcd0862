"""Channel consistency between a teacher and a student (paper Section 3.2, Eq. 3-6).

Both networks see the same N samples; their feature maps are globally average-pooled, giving
``A(F_T)`` (N x c_T) and ``A(F_S)`` (N x c_S). Teacher channel ``i`` is the N-vector
``a_i = A(F_T)[:, i]``, student channel ``j`` is ``b_j = A(F_S)[:, j]``. The consistency matrix
``M`` (c_T x c_S) scores every pair; a larger ``M[i, j]`` means more consistent channels.

Metrics (:data:`METRICS`):

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
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

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


# --------------------------------------------------------------------------------------------
# Metric formulas on features in memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Formula:
    """A metric on features in memory: over all channel pairs, and over pairs (j, j) only."""

    matrix: Callable[[Tensor, Tensor], Tensor]
    diagonal: Callable[[Tensor, Tensor], Tensor]


def _lp(p: float) -> _Formula:
    return _Formula(
        matrix=lambda a, b: _inverse(
            torch.cdist(a.T, b.T, p=p, compute_mode="donot_use_mm_for_euclid_dist")
        ),
        diagonal=lambda t, s: _inverse(torch.linalg.vector_norm(t - s, ord=p, dim=0)),
    )


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    return _ratio(a.T @ b, (a * a).sum(0)[:, None], (b * b).sum(0)[None, :])


def _cosine_diagonal(t: Tensor, s: Tensor) -> Tensor:
    return _ratio((t * s).sum(0), (t * t).sum(0), (s * s).sum(0))


def _kl_matrix(a: Tensor, b: Tensor) -> Tensor:
    log_p, log_q = torch.log_softmax(a, dim=0), torch.log_softmax(b, dim=0)
    p = log_p.exp()
    kl = (p * log_p).sum(0)[:, None] - p.T @ log_q
    return _inverse(kl.clamp_min(0.0))


def _kl_diagonal(t: Tensor, s: Tensor) -> Tensor:
    log_p, log_q = torch.log_softmax(t, dim=0), torch.log_softmax(s, dim=0)
    return _inverse((log_p.exp() * (log_p - log_q)).sum(0).clamp_min(0.0))


_FORMULAS: Registry[_Formula] = Registry("consistency metric")
_FORMULAS.register("l1", _lp(1.0))
_FORMULAS.register("l2", _lp(2.0))
_FORMULAS.register(
    "correlation",
    _Formula(
        matrix=lambda a, b: _cosine_matrix(_center(a), _center(b)),
        diagonal=lambda t, s: _cosine_diagonal(_center(t), _center(s)),
    ),
)
_FORMULAS.register("cosine", _Formula(matrix=_cosine_matrix, diagonal=_cosine_diagonal))
_FORMULAS.register("kl", _Formula(matrix=_kl_matrix, diagonal=_kl_diagonal))

METRICS: tuple[str, ...] = tuple(_FORMULAS.names())
"""Accepted metric names: ``("l1", "l2", "correlation", "cosine", "kl")``."""


def _check_metric(metric: str) -> str:
    _FORMULAS.get(metric)
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
    formula = _FORMULAS.get(metric)
    a, b = _check_pair(feat_t, feat_s)
    return formula.matrix(a.double(), b.double()).cpu()


def diagonal_consistency(t: Tensor, s: Tensor, metric: str) -> Tensor:
    """Per-channel consistency ``M[j, j]`` between ``t[:, j]`` and ``s[:, j]`` (N x c each).

    Differentiable and in the inputs' dtype: the score a learned transform maximises. Inputs must be
    finite pooled features with equal shapes.
    """
    formula = _FORMULAS.get(metric)
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

_MOMENT_METRICS = frozenset({"l2", "cosine", "correlation"})
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


class ConsistencyStatistics:
    """Streaming accumulator of consistency matrices of pooled features; memory independent of N.

    Feed batches of pooled teacher/student features with :meth:`update`; read ``M`` with
    :meth:`matrix`. Two accumulators over disjoint batches combine with :meth:`merge`.
    Only the statistics the requested ``metrics`` need are kept:

    * ``l2``, ``cosine``, ``correlation``: per-channel first and second moments and the cross
      product ``sum_n a_ni b_nj``, of data shifted by a per-channel constant (the first batch's
      mean, see :func:`_channel_offset`), all float64. Shifting keeps the sums well conditioned
      when features have mean ≫ std. Each block of ``k`` samples (see Memory) adds to the cross
      product its centred product, one float32 matrix product ``XᵀY`` of its samples minus their
      block mean, plus ``k d_t d_sᵀ`` for its exact float64 block means ``d`` (the pairwise
      co-moment update of Chan et al.). So the float32 rounding scales with the spread within a
      block, not with how far the block means lie from the shift, and the result does not depend
      on the batch sizes (a 1-sample first batch, class-sorted batches) beyond float64 rounding.
      Every metric is derived from the sums in float64. The float32 products limit the precision
      of an L2 distance between near-identical channels to ~1e-7 of the channel norms, and of a
      correlation or cosine to ~1e-7..5e-7 absolute for a few hundred samples in one block (at
      N=50k, c=256 the largest errors against float64 are ~2e-8 for correlation/cosine, ~1e-8
      relative for l2 and ~3e-8 relative for kl).
    * ``kl``: a streaming log-sum-exp per channel on the shifted data (a softmax over samples is
      shift invariant): for teacher channel i the running maximum ``m_i``,
      ``Z_i = sum exp(a_ni - m_i)`` and ``U_i = sum exp(a_ni - m_i) a_ni``; for student channel j
      ``m'_j`` and ``Z'_j`` (all float64, per batch); and ``V_ij = sum_n exp(a_ni - m_i) b_nj``
      (one float32 matrix product per block on its centred samples, their offset added with the
      block's float64 Z; its rows rescaled in float64 when a maximum grows).
      Then ``KL_ij = (U_i - V_ij) / Z_i - (m_i + log Z_i) + (m'_j + log Z'_j)``.
    * ``l1``: no sufficient statistic exists, so ``sum_n |a_ni - b_nj|`` is accumulated exactly
      with float64 ``torch.cdist(p=1)`` per batch, in chunks of teacher channels that bound the
      temporary memory. Costs O(N c_T c_S) like the moments' matmul but runs about 20 times
      slower, since ``|x - y|`` has no fast matrix-product kernel.

    Memory: the state (``c_T x c_S`` float64 per matrix statistic, vectors otherwise) plus, for
    every metric but ``l1``, a buffer of the samples not yet multiplied (float32,
    ``rows x (c_T + c_S)``; :attr:`workspace_bytes`). It grows with the samples up to one block of
    ``4 c_T c_S / (c_T + c_S)`` rows clamped to 512..2048 (``_BLOCK_ROWS``): at most two
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
        self._state = self._empty_state()
        # Samples waiting for the next block product, rows [0, _fill): float32 shifted features
        # minus the block's reference _ref (its first one). Float64 per block: _block_sum, the sum
        # of its shifted samples; _block_z, its teacher Z for kl (see _flush).
        self._rows_t: Tensor | None = None
        self._rows_s: Tensor | None = None
        self._fill = 0
        vector = dict(dtype=torch.float64, device=self.device)
        self._ref_t, self._ref_s = torch.zeros(c_t, **vector), torch.zeros(c_s, **vector)
        self._block_sum_t = torch.zeros(c_t, **vector)
        self._block_sum_s = torch.zeros(c_s, **vector)
        self._block_z = torch.zeros(c_t, **vector)
        # Block length: 2 c_T c_S / (c_T + c_S) * 2 rows keeps the buffer within two c_T x c_S
        # float64 matrices; 512..2048 rows make the float64 additions of the products cheap.
        self._block_rows = min(_BLOCK_ROWS[1],
                               max(_BLOCK_ROWS[0], 4 * c_t * c_s // (c_t + c_s)))
        # The maxima that V is expressed against; equal to the state's max_t after every flush.
        self._v_max = self._state["max_t"].clone() if "kl" in self.metrics else None

    # ---- state layout ---------------------------------------------------------------------

    @property
    def _moments(self) -> bool:
        return not _MOMENT_METRICS.isdisjoint(self.metrics)

    @property
    def _buffered(self) -> bool:
        """Whether a metric needs the block products (every metric but l1)."""
        return self._moments or "kl" in self.metrics

    @property
    def workspace_bytes(self) -> int:
        """Bytes of this accumulator's sample buffer (not counting the state); bounded, not ∝ N."""
        return sum(t.numel() * t.element_size() for t in (self._rows_t, self._rows_s)
                   if t is not None)

    def _empty_state(self) -> dict[str, Tensor]:
        c_t, c_s = self.c_t, self.c_s

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)

        state = {"shift_t": zeros(c_t), "shift_s": zeros(c_s)}
        if self._moments:
            state.update(sum_t=zeros(c_t), sum_s=zeros(c_s), sq_t=zeros(c_t), sq_s=zeros(c_s),
                         cross=zeros(c_t, c_s))
        if "kl" in self.metrics:
            state.update(max_t=zeros(c_t) - math.inf, z_t=zeros(c_t), u_t=zeros(c_t),
                         max_s=zeros(c_s) - math.inf, z_s=zeros(c_s), v=zeros(c_t, c_s))
        if "l1" in self.metrics:
            state.update(l1=zeros(c_t, c_s))
        return state

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
        if "l1" in self.metrics:
            self._update_l1(x_t.double(), x_s.double())
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
            for block in (self._block_sum_t, self._block_sum_s, self._block_z):
                block.zero_()
        sum_t, sum_s = a.sum(0), b.sum(0)
        self._block_sum_t.add_(sum_t)
        self._block_sum_s.add_(sum_s)
        if self._moments:
            st["sum_t"].add_(sum_t)
            st["sum_s"].add_(sum_s)
            for x, squares in ((a, "sq_t"), (b, "sq_s")):
                work = _scratch("work", tuple(x.shape), torch.float64, self.device)
                st[squares].add_(torch.mul(x, x, out=work).sum(0))
        if "kl" in self.metrics:
            for x, top, zs, u in ((a, "max_t", (st["z_t"], self._block_z), st["u_t"]),
                                  (b, "max_s", (st["z_s"],), None)):
                new = torch.maximum(st[top], x.amax(0))
                for total in zs if u is None else (*zs, u):
                    _rescale_rows(total, st[top] - new)
                st[top].copy_(new)
                weights = _scratch("work", tuple(x.shape), torch.float64, self.device)
                torch.sub(x, new, out=weights).exp_()
                z = weights.sum(0)
                for total in zs:
                    total.add_(z)
                if u is not None:
                    u.add_(weights.mul_(x).sum(0))
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
        subtracted in float32), so the float32 products see only the spread within the block. The
        cross product gains that centred product plus ``k mean_t mean_sᵀ`` for the exact float64
        block means of the shifted samples. The float32 rows do not depend on the shift (beyond
        float64 rounding), which enters only float64 terms: the result does not depend on how the
        samples were batched.
        """
        k = self._fill
        if k == 0:
            return
        st = self._state
        a, b = self._rows_t[:k], self._rows_s[:k]
        mean_t, mean_s = self._block_sum_t / k, self._block_sum_s / k  # of the shifted samples
        center_t, center_s = (mean_t - self._ref_t).float(), (mean_s - self._ref_s).float()
        a.sub_(center_t)
        b.sub_(center_s)
        if self._moments:
            self._add_product(st["cross"], a, b)
            st["cross"].addr_(mean_t, mean_s, alpha=k)
        if "kl" in self.metrics:
            top = st["max_t"]
            _rescale_rows(st["v"], self._v_max - top)
            # The rows stand for the shifted samples minus o: a + o_t = x_t - shift_t. Weights
            # exp(a + o_t - m) are float32 exp(a - fl(m - o_t)) (about <= 1) times the float64
            # factor exp(fl(m - o_t) - (m - o_t)) that puts them against the exact maxima m.
            # Then V += sum_n w (b + o_s) = wᵀb + Z o_sᵀ, with the block's exact float64 Z.
            offset_t = self._ref_t + center_t.double()
            offset_s = self._ref_s + center_s.double()
            limit = top - offset_t
            limit32 = limit.float()
            a.sub_(limit32).exp_()  # the buffer is spent: overwrite it with the weights
            self._add_product(st["v"], a, b, row_scale=torch.exp(limit32.double() - limit))
            st["v"].addr_(self._block_z, offset_s)
            self._v_max.copy_(top)
        self._fill = 0

    def _add_product(self, total: Tensor, a: Tensor, b: Tensor,
                     row_scale: Tensor | None = None) -> None:
        """``total += row_scale[:, None] * aᵀb``: float32 products added in float64, by chunks."""
        chunk = max(1, _PRODUCT_ELEMENTS // self.c_s)
        for start in range(0, self.c_t, chunk):
            rows = min(chunk, self.c_t - start)
            product = _scratch("product", (rows, self.c_s), torch.float32, self.device)
            torch.mm(a[:, start:start + rows].T, b, out=product)
            wide = _scratch("work", (rows, self.c_s), torch.float64, self.device).copy_(product)
            if row_scale is not None:
                wide.mul_(row_scale[start:start + rows, None])
            total[start:start + rows].add_(wide)

    def _update_l1(self, a: Tensor, b: Tensor) -> None:
        a_channels, b_channels = a.T.contiguous(), b.T.contiguous()
        chunk = max(1, _L1_CHUNK_ELEMENTS // self.c_s)
        for start in range(0, self.c_t, chunk):
            self._state["l1"][start:start + chunk].add_(
                torch.cdist(a_channels[start:start + chunk], b_channels, p=1)
            )

    def _absorb_kl(self, max_t: Tensor, z_t: Tensor, u_t: Tensor, max_s: Tensor, z_s: Tensor,
                   v: Tensor) -> None:
        """Add log-sum-exp statistics of other samples (in this accumulator's shift).

        This accumulator's buffer must be empty (V against the state's maxima).
        """
        st = self._state
        new_t, new_s = torch.maximum(st["max_t"], max_t), torch.maximum(st["max_s"], max_s)
        if self.n:
            for key in ("z_t", "u_t", "v"):
                _rescale_rows(st[key], st["max_t"] - new_t)
            _rescale_rows(st["z_s"], st["max_s"] - new_s)
        incoming_t = max_t - new_t
        st["z_t"].add_(_rescale_rows(z_t, incoming_t))
        st["u_t"].add_(_rescale_rows(u_t, incoming_t))
        st["v"].add_(_rescale_rows(v, incoming_t))
        st["z_s"].add_(_rescale_rows(z_s, max_s - new_s))
        st["max_t"].copy_(new_t)
        st["max_s"].copy_(new_s)
        self._v_max.copy_(new_t)

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
            if self._v_max is not None:
                self._v_max = self._state["max_t"].clone()
            return
        st, n = self._state, other.n
        d_t, d_s = theirs["shift_t"] - st["shift_t"], theirs["shift_s"] - st["shift_s"]
        if self._moments:
            st["sum_t"].add_(theirs["sum_t"] + n * d_t)
            st["sum_s"].add_(theirs["sum_s"] + n * d_s)
            st["sq_t"].add_(theirs["sq_t"] + 2 * d_t * theirs["sum_t"] + n * d_t * d_t)
            st["sq_s"].add_(theirs["sq_s"] + 2 * d_s * theirs["sum_s"] + n * d_s * d_s)
            st["cross"].add_(
                theirs["cross"]
                + torch.outer(d_t, theirs["sum_s"])
                + torch.outer(theirs["sum_t"], d_s)
                + n * torch.outer(d_t, d_s)
            )
        if "kl" in self.metrics:
            self._absorb_kl(
                max_t=theirs["max_t"] + d_t, z_t=theirs["z_t"].clone(),
                u_t=theirs["u_t"] + d_t * theirs["z_t"],
                max_s=theirs["max_s"] + d_s, z_s=theirs["z_s"].clone(),
                v=theirs["v"] + torch.outer(theirs["z_t"], d_s),
            )
        if "l1" in self.metrics:
            st["l1"].add_(theirs["l1"])
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
        st, n = self._state, self.n
        # In-place arithmetic on one or two c_T x c_S temporaries: these matrices can be large.
        if metric == "l1":
            result = st["l1"].add(EPS).reciprocal_()
        elif metric == "kl":
            log_norm_t = st["max_t"] + torch.log(st["z_t"])
            log_norm_s = st["max_s"] + torch.log(st["z_s"])
            result = torch.sub(st["u_t"][:, None], st["v"]).div_(st["z_t"][:, None])
            result.sub_(log_norm_t[:, None]).add_(log_norm_s[None, :])
            result.clamp_min_(0.0).add_(EPS).reciprocal_()
        elif metric == "correlation":
            result = torch.outer(st["sum_t"], st["sum_s"]).div_(-n).add_(st["cross"])  # covariance
            var_t = (st["sq_t"] - st["sum_t"] ** 2 / n).clamp_min(0.0)
            var_s = (st["sq_s"] - st["sum_s"] ** 2 / n).clamp_min(0.0)
            _normalize_(result, var_t, var_s)
        else:
            # Raw sums from shifted ones: a = a' + shift_t, b = b' + shift_s.
            shift_t, shift_s = st["shift_t"], st["shift_s"]
            if metric == "cosine":
                # dot = cross + shift_t (sum_s + n shift_s)ᵀ + sum_t shift_sᵀ
                result = torch.outer(shift_t, st["sum_s"] + n * shift_s).add_(st["cross"])
                result.addr_(st["sum_t"], shift_s)
                sq_t = st["sq_t"] + 2 * shift_t * st["sum_t"] + n * shift_t ** 2
                sq_s = st["sq_s"] + 2 * shift_s * st["sum_s"] + n * shift_s ** 2
                _normalize_(result, sq_t, sq_s)
            else:  # l2: ||a - b||² = ||a' - b'||² + δ (2 sum(a' - b') + n δ), δ = shift_t - shift_s
                delta = shift_t[:, None] - shift_s[None, :]
                result = torch.sub(st["sum_t"][:, None], st["sum_s"][None, :]).mul_(2)
                result.add_(delta, alpha=n).mul_(delta)
                result.add_(st["sq_t"][:, None]).add_(st["sq_s"][None, :])
                result.add_(st["cross"], alpha=-2)
                result.clamp_min_(0.0).sqrt_().add_(EPS).reciprocal_()
        return result.cpu()

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
        if self._v_max is not None:
            self._v_max = self._state["max_t"].clone()

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
