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
        if not torch.isfinite(x).all():
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
      mean, see :func:`_channel_offset`). The batch product ``XᵀY`` runs in float32 for speed and
      is added into float64 sums; every metric is derived from the sums in float64. Shifting keeps
      the sums well conditioned when features have mean ≫ std. The float32 product limits the
      precision of an L2 distance between near-identical channels to ~1e-7 of the channel norms.
    * ``kl``: a streaming log-sum-exp per channel on the shifted data (a softmax over samples is
      shift invariant): for teacher channel i the running maximum ``m_i``,
      ``Z_i = sum exp(a_ni - m_i)`` and ``U_i = sum exp(a_ni - m_i) a_ni``; for student channel j
      ``m'_j`` and ``Z'_j``; and ``V_ij = sum_n exp(a_ni - m_i) b_nj`` (one float32 matmul per
      batch, rescaled when a maximum grows). Then
      ``KL_ij = (U_i - V_ij) / Z_i - (m_i + log Z_i) + (m'_j + log Z'_j)``.
    * ``l1``: no sufficient statistic exists, so ``sum_n |a_ni - b_nj|`` is accumulated exactly
      with float64 ``torch.cdist(p=1)`` per batch, in chunks of teacher channels that bound the
      temporary memory. Costs O(N c_T c_S) like the moments' matmul but runs about 20 times
      slower, since ``|x - y|`` has no fast matrix-product kernel.

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

    # ---- state layout ---------------------------------------------------------------------

    @property
    def _moments(self) -> bool:
        return not _MOMENT_METRICS.isdisjoint(self.metrics)

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
        a = x_t.detach().to(self.device, torch.float64)
        b = x_s.detach().to(self.device, torch.float64)
        st = self._state
        if self.n == 0:
            st["shift_t"].copy_(_channel_offset(a))
            st["shift_s"].copy_(_channel_offset(b))
        a_shift, b_shift = a - st["shift_t"], b - st["shift_s"]
        if self._moments:
            st["sum_t"].add_(a_shift.sum(0))
            st["sum_s"].add_(b_shift.sum(0))
            st["sq_t"].add_((a_shift * a_shift).sum(0))
            st["sq_s"].add_((b_shift * b_shift).sum(0))
            st["cross"].add_(a_shift.float().T @ b_shift.float())
        if "kl" in self.metrics:
            self._update_kl(a_shift, b_shift)
        if "l1" in self.metrics:
            self._update_l1(a, b)
        self.n += a.shape[0]

    def _update_kl(self, a: Tensor, b: Tensor) -> None:
        st = self._state
        max_t = torch.maximum(st["max_t"], a.amax(0))
        max_s = torch.maximum(st["max_s"], b.amax(0))
        weights = torch.exp(a - max_t)
        self._absorb_kl(
            max_t=max_t, z_t=weights.sum(0), u_t=(weights * a).sum(0),
            max_s=max_s, z_s=torch.exp(b - max_s).sum(0), v=weights.float().T @ b.float(),
        )

    def _absorb_kl(self, max_t: Tensor, z_t: Tensor, u_t: Tensor, max_s: Tensor, z_s: Tensor,
                   v: Tensor) -> None:
        """Add log-sum-exp statistics of other samples (in this accumulator's shift)."""
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

    def _update_l1(self, a: Tensor, b: Tensor) -> None:
        a_channels, b_channels = a.T.contiguous(), b.T.contiguous()
        chunk = max(1, _L1_CHUNK_ELEMENTS // self.c_s)
        for start in range(0, self.c_t, chunk):
            self._state["l1"][start:start + chunk].add_(
                torch.cdist(a_channels[start:start + chunk], b_channels, p=1)
            )

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
        theirs = {key: value.to(self.device) for key, value in other._state.items()}
        if self.n == 0:
            self._state = {key: value.clone() for key, value in theirs.items()}
            self.n = other.n
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
        st, n = self._state, self.n
        if metric == "l1":
            result = _inverse(st["l1"])
        elif metric == "kl":
            log_norm_t = st["max_t"] + torch.log(st["z_t"])
            log_norm_s = st["max_s"] + torch.log(st["z_s"])
            kl = ((st["u_t"][:, None] - st["v"]) / st["z_t"][:, None]
                  - log_norm_t[:, None] + log_norm_s[None, :])
            result = _inverse(kl.clamp_min(0.0))
        elif metric == "correlation":
            cov = st["cross"] - torch.outer(st["sum_t"], st["sum_s"]) / n
            var_t = (st["sq_t"] - st["sum_t"] ** 2 / n).clamp_min(0.0)
            var_s = (st["sq_s"] - st["sum_s"] ** 2 / n).clamp_min(0.0)
            result = _ratio(cov, var_t[:, None], var_s[None, :])
        else:
            # Raw sums from shifted ones: a = a' + shift_t, b = b' + shift_s.
            shift_t, shift_s = st["shift_t"], st["shift_s"]
            if metric == "cosine":
                dot = (st["cross"] + torch.outer(shift_t, st["sum_s"])
                       + torch.outer(st["sum_t"], shift_s) + n * torch.outer(shift_t, shift_s))
                sq_t = st["sq_t"] + 2 * shift_t * st["sum_t"] + n * shift_t ** 2
                sq_s = st["sq_s"] + 2 * shift_s * st["sum_s"] + n * shift_s ** 2
                result = _ratio(dot, sq_t[:, None], sq_s[None, :])
            else:  # l2: ||a - b||² = ||a' - b'||² + 2 δ sum(a' - b') + n δ², δ = shift_t - shift_s
                delta = shift_t[:, None] - shift_s[None, :]
                squared = (st["sq_t"][:, None] + st["sq_s"][None, :] - 2 * st["cross"]
                           + 2 * delta * (st["sum_t"][:, None] - st["sum_s"][None, :])
                           + n * delta ** 2)
                result = _inverse(torch.sqrt(squared.clamp_min(0.0)))
        return result.cpu()

    # ---- persistence ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """A plain dictionary (tensors, str, int) that ``torch.load(weights_only=True)`` reads."""
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
