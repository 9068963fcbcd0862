"""Channel-based transformations of teacher features (paper Section 3.3, Eq. 6-8; Table 6).

A transform maps a teacher feature batch (b x c_T x h x w, or pooled b x c_T) to b x c_S x ...
so that the transformed teacher is more consistent with the student.

Matching strategies (:data:`STRATEGIES`) turn a consistency matrix ``M`` (c_T x c_S) into a channel
map: ``map[j]`` is the teacher channel student channel ``j`` receives, i.e.
``transformed[:, j] = teacher[:, map[j]]`` (:func:`match`, :class:`ChannelTransform`).

``identity``
    ``map[j] = j``; needs c_T == c_S. The plain distillation baseline.
``random``
    A seeded random map without repeats (when c_T >= c_S).
``greedy``
    ``map[j] = argmax_i M[i, j]`` (Eq. 7). Maximises Γ but may repeat teacher channels.
``bipartite``
    The maximum-weight 1-to-1 matching (Eq. 8, Kuhn-Munkres via
    ``scipy.optimize.linear_sum_assignment``). When c_T > c_S it selects c_S distinct teacher
    channels.
``subnet-fc``, ``subnet-res``
    Learned transforms (:class:`LearnedTransform`, :func:`fit_learned_transform`), trained with the
    consistency score as the objective.

Our interpretation for c_T < c_S (more student than teacher channels, not covered by the paper):
``random`` and ``bipartite`` use each teacher channel at most ``ceil(c_S / c_T)`` times;
``bipartite`` solves the assignment on ``M`` tiled that many times along the teacher axis.

Per-class transforms (Table 6): :class:`PerClassTransform` holds K transforms for K equal groups of
class labels and applies each sample's group's transform.

Dynamic transforms (Table 5): :class:`DynamicMatching` re-matches a :class:`ChannelTransform`
during distillation from the features the run sees.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from kcd import naming
from kcd.checkpoint import atomic_save, load_format
from kcd.consistency import ConsistencyStatistics, diagonal_consistency, gamma
from kcd.errors import KcdError
from kcd.features import global_avg_pool
from kcd.models.small_conv import use_small_conv_grads
from kcd.registry import Registry

_TRANSFORM_FORMAT = "kcd.transform"

Matcher = Callable[[Tensor, int | None], Tensor]
STRATEGIES: Registry[Matcher] = Registry("matching strategy")


@dataclass(frozen=True)
class SubNet:
    """A learned strategy's network: ``build(transform, c_t, c_s)`` adds its layers to the
    :class:`LearnedTransform`, ``forward(transform, maps)`` takes b x c_T x h x w maps to
    b x c_S x h x w."""

    build: Callable[[nn.Module, int, int], None]
    forward: Callable[[nn.Module, Tensor], Tensor]


SUBNETS: Registry[SubNet] = Registry("learned transform")
"""The learned strategies (Section 3.3's sub-nets), each trained on features instead of matching
channels on ``M``; :data:`kcd.naming.LEARNED_STRATEGIES` names the same ones."""


def _fc_layers(t: nn.Module, c_t: int, c_s: int) -> None:
    t.fc = nn.Conv2d(c_t, c_s, kernel_size=1)


def _residual_layers(t: nn.Module, c_t: int, c_s: int) -> None:
    t.shortcut = nn.Conv2d(c_t, c_s, kernel_size=1, bias=False)
    t.branch = nn.Sequential(
        nn.Conv2d(c_t, c_s, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_s),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_s, c_s, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_s),
    )


def _fc_forward(t: nn.Module, maps: Tensor) -> Tensor:
    return t.fc(maps)


def _residual_forward(t: nn.Module, maps: Tensor) -> Tensor:
    return t.shortcut(maps) + t.branch(maps)


SUBNETS.register("subnet-fc", SubNet(_fc_layers, _fc_forward))
SUBNETS.register("subnet-res", SubNet(_residual_layers, _residual_forward))
LEARNED_KINDS: tuple[str, ...] = tuple(SUBNETS.names())
"""Strategies that learn a sub-network instead of matching channels on ``M``."""


# --------------------------------------------------------------------------------------------
# Matching strategies
# --------------------------------------------------------------------------------------------


def _max_uses(c_t: int, c_s: int) -> int:
    """How often a 1-to-1 style strategy may use one teacher channel: ``ceil(c_S / c_T)``."""
    return math.ceil(c_s / c_t)


@STRATEGIES.register("identity")
def _identity(m: Tensor, seed: int | None) -> Tensor:
    c_t, c_s = m.shape
    if c_t != c_s:
        raise KcdError(
            f"identity needs equal channel counts, got c_T={c_t} c_S={c_s}; use bipartite or greedy"
        )
    return torch.arange(c_s)


@STRATEGIES.register("random")
def _random(m: Tensor, seed: int | None) -> Tensor:
    c_t, c_s = m.shape
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    pool = torch.arange(c_t).repeat(_max_uses(c_t, c_s))
    return pool[torch.randperm(pool.numel(), generator=generator)[:c_s]]


@STRATEGIES.register("greedy")
def _greedy(m: Tensor, seed: int | None) -> Tensor:
    return m.argmax(dim=0)


@STRATEGIES.register("bipartite")
def _bipartite(m: Tensor, seed: int | None) -> Tensor:
    c_t, c_s = m.shape
    tiled = m.repeat(_max_uses(c_t, c_s), 1)
    rows, cols = linear_sum_assignment(tiled.numpy(), maximize=True)
    channel_map = torch.empty(c_s, dtype=torch.long)
    channel_map[torch.as_tensor(cols)] = torch.as_tensor(rows) % c_t
    return channel_map


def _learned_strategy(kind: str) -> Matcher:
    def refuse(m: Tensor, seed: int | None) -> Tensor:
        raise KcdError(
            f"strategy '{kind}' is learned from features, not matched on a consistency matrix; "
            f"use fit_learned_transform('{kind}', pairs)"
        )

    return refuse


for _kind in LEARNED_KINDS:
    STRATEGIES.register(_kind, _learned_strategy(_kind))

naming.check_implemented("learned strategy", naming.LEARNED_STRATEGIES, LEARNED_KINDS,
                         "kcd/transforms.py")
naming.check_implemented("strategy", naming.STRATEGY_NAMES, STRATEGIES.names(),
                         "kcd/transforms.py")


def match(matrix: Tensor, strategy: str, seed: int | None = None) -> Tensor:
    """Channel map (LongTensor of length c_S) of ``strategy`` on a consistency matrix (c_T x c_S).

    ``map[j]`` is the teacher channel student channel ``j`` receives. ``seed`` is used by
    ``random`` only (None means 0).
    """
    matcher = STRATEGIES.get(strategy)
    m = torch.as_tensor(matrix).detach().to("cpu", torch.float64)
    if m.dim() != 2 or 0 in m.shape:
        raise KcdError(f"a consistency matrix must be 2-D (c_T x c_S), got shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise KcdError("consistency matrix contains NaN or inf values")
    return matcher(m, seed)


# --------------------------------------------------------------------------------------------
# Transform modules
# --------------------------------------------------------------------------------------------


class _Transform(nn.Module):
    """Common part of the transforms: channel counts, metadata and the input check."""

    def __init__(self, c_t: int, c_s: int, meta: dict | None) -> None:
        super().__init__()
        self.c_t, self.c_s = c_t, c_s
        self.meta: dict[str, Any] = dict(meta or {})

    def _check_input(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.c_t:
            got = x.shape[1] if x.dim() >= 2 else f"shape {tuple(x.shape)}"
            raise KcdError(f"transform expects c_T={self.c_t} teacher channels, got {got}")


class ChannelTransform(_Transform):
    """Selects/reorders teacher channels: ``out[:, j] = x[:, index[j]]`` (greedy, bipartite...)."""

    def __init__(self, index: Tensor, c_t: int, meta: dict | None = None) -> None:
        index = torch.as_tensor(index, dtype=torch.long).detach().cpu()
        if index.dim() != 1 or index.numel() == 0:
            raise KcdError(
                f"channel index must be a non-empty 1-D list, got shape {tuple(index.shape)}"
            )
        if index.min() < 0 or index.max() >= c_t:
            raise KcdError(f"channel index holds teacher channels outside 0..{c_t - 1}")
        super().__init__(c_t, index.numel(), meta)
        self.register_buffer("index", index)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check_input(x)
        return x.index_select(1, self.index)


class LearnedTransform(_Transform):
    """A sub-network from c_T to c_S channels (Section 3.3, "learning-based").

    ``subnet-fc``: one 1x1 convolution, i.e. a fully connected layer over channels applied at every
    position. ``subnet-res``: one residual block, a 1x1 projection c_T -> c_S as the shortcut plus a
    conv3x3-BN-ReLU-conv3x3-BN branch. The block's output has no final ReLU, so it can match
    signed features as well as post-ReLU ones. Pooled inputs (b x c_T) are treated as 1x1 maps.
    """

    def __init__(self, kind: str, c_t: int, c_s: int, meta: dict | None = None) -> None:
        if kind not in LEARNED_KINDS:
            raise KcdError(f"unknown learned transform '{kind}'; known: {', '.join(LEARNED_KINDS)}")
        super().__init__(c_t, c_s, meta)
        self.kind = kind
        self._net = SUBNETS.get(kind)
        self._net.build(self, c_t, c_s)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check_input(x)
        if x.dim() not in (2, 4):
            raise KcdError(
                f"learned transform takes b x c or b x c x h x w, got shape {tuple(x.shape)}"
            )
        maps = x[:, :, None, None] if x.dim() == 2 else x
        out = self._net.forward(self, maps)
        return out[:, :, 0, 0] if x.dim() == 2 else out


def label_groups(labels: Tensor, k: int, num_classes: int) -> Tensor:
    """Group of each label when ``num_classes`` labels are cut into ``k`` equal ranges (Table 6).

    ``group = label * k // num_classes``: with k=100 of 1000 classes, labels 0-9 are group 0.
    """
    if not 1 <= k <= num_classes:
        raise KcdError(
            f"K={k} transforms for num_classes={num_classes}; "
            "K must be between 1 and the number of classes"
        )
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise KcdError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return labels * k // num_classes


class PerClassTransform(_Transform):
    """K transforms for K equal groups of class labels (Table 6); samples are routed by label."""

    def __init__(
        self, transforms: list[nn.Module], num_classes: int, meta: dict | None = None
    ) -> None:
        if not transforms:
            raise KcdError("PerClassTransform needs at least one transform")
        if len(transforms) > num_classes:
            raise KcdError(
                f"K={len(transforms)} transforms for num_classes={num_classes}; "
                "K must be between 1 and the number of classes"
            )
        for t in transforms:
            if not isinstance(t, (ChannelTransform, LearnedTransform)):
                raise KcdError(
                    "per-class transforms must be ChannelTransform or LearnedTransform, "
                    f"got {type(t).__name__}"
                )
        shapes = {(t.c_t, t.c_s) for t in transforms}
        if len(shapes) != 1:
            raise KcdError(f"per-class transforms disagree on (c_T, c_S): {sorted(shapes)}")
        (c_t, c_s), = shapes
        super().__init__(c_t, c_s, meta)
        self.num_classes = num_classes
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        self._check_input(x)
        if labels is None:
            raise KcdError(
                "a per-class transform needs the batch's class labels: call it as t(x, labels)"
            )
        labels = torch.as_tensor(labels, device=x.device)
        if labels.shape != x.shape[:1]:
            raise KcdError(f"got {labels.numel()} labels for a batch of {x.shape[0]} samples")
        groups = label_groups(labels, len(self.transforms), self.num_classes)
        out = x.new_empty((x.shape[0], self.c_s, *x.shape[2:]))
        for group in groups.unique().tolist():
            chosen = groups == group
            out[chosen] = self.transforms[group](x[chosen])
        return out


# --------------------------------------------------------------------------------------------
# Building transforms
# --------------------------------------------------------------------------------------------


def build_transform(matrix: Tensor, strategy: str, seed: int | None = None,
                    meta: dict | None = None) -> ChannelTransform:
    """:class:`ChannelTransform` of ``strategy`` on ``M``; meta records the strategy and Γ.

    ``meta`` carries the caller's entries (teacher, student, layer, metric, ...); added are
    ``strategy``, ``seed``, ``gamma_before`` (Γ of the identity map, None unless M is square) and
    ``gamma_after`` (Γ of the chosen map).
    """
    matrix = torch.as_tensor(matrix)
    channel_map = match(matrix, strategy, seed)
    c_t, c_s = matrix.shape
    info = dict(meta or {})
    info.update(
        strategy=strategy,
        seed=seed,
        gamma_before=gamma(matrix, torch.arange(c_s)) if c_t == c_s else None,
        gamma_after=gamma(matrix, channel_map),
    )
    return ChannelTransform(channel_map, c_t, meta=info)


Pairs = Iterable[tuple[Tensor, Tensor]] | Callable[[], Iterable[tuple[Tensor, Tensor]]]


def _cycle(pairs: Pairs) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (teacher_map, student_map) batches: re-iterates ``pairs`` (or calls it) per pass."""
    seen = 0
    while True:
        passed = 0
        for batch in pairs() if callable(pairs) else pairs:
            passed += 1
            yield batch
        if passed == 0:
            raise KcdError(
                f"pairs ran out after {seen} batches; pass a list, a DataLoader or a callable "
                "returning a fresh iterable of (teacher_map, student_map) batches"
            )
        seen += passed


def _pooled(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x


def fit_learned_transform(
    kind: str,
    pairs: Pairs,
    metric: str = "correlation",
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    meta: dict | None = None,
) -> LearnedTransform:
    """Train a ``subnet-fc`` / ``subnet-res`` transform with the consistency score as objective.

    ``pairs`` yields (teacher_map, student_map) batches (b x c x h x w or pooled b x c); it is
    iterated again (or called again, if callable) until ``steps`` Adam steps are done. Each step
    maximises the mean :func:`diagonal_consistency` between the pooled transformed teacher and the
    pooled student. Deterministic for a seed (given the same batches). Returns the module in eval
    mode without gradients. Its meta records Γ (the summed diagonal consistency) on the first
    batch: ``gamma_before`` of the untransformed teacher (None unless c_T == c_S), ``gamma_init``
    of the untrained and ``gamma_after`` of the trained sub-network.
    """
    if kind not in LEARNED_KINDS:
        raise KcdError(f"unknown learned transform '{kind}'; known: {', '.join(LEARNED_KINDS)}")
    if steps < 1:
        raise KcdError(f"steps must be at least 1, got {steps}")
    batches = _cycle(pairs)
    first_t, first_s = next(batches)
    c_t, c_s = first_t.shape[1], first_s.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = LearnedTransform(kind, c_t, c_s).to(first_t.device)
    if first_t.device.type == "cpu":  # its 3x3 convolutions on pooled 1x1 maps: 2x per step
        use_small_conv_grads(module)

    def score(teacher: Tensor, student: Tensor) -> Tensor:
        return diagonal_consistency(_pooled(module(teacher)), _pooled(student).detach(), metric)

    def first_gamma() -> float:
        module.eval()
        with torch.no_grad():
            return float(score(first_t, first_s).sum())

    gamma_init = first_gamma()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    steps_batches = itertools.chain([(first_t, first_s)], itertools.islice(batches, steps - 1))
    for teacher, student in steps_batches:
        optimizer.zero_grad()
        loss = -score(teacher.detach(), student).mean()
        loss.backward()
        optimizer.step()
    gamma_after = first_gamma()
    module.requires_grad_(False)
    identity_gamma = (
        float(diagonal_consistency(_pooled(first_t), _pooled(first_s), metric).sum())
        if c_t == c_s else None
    )
    module.meta = dict(meta or {})
    module.meta.update(strategy=kind, metric=metric, steps=steps, lr=lr, seed=seed,
                       gamma_before=identity_gamma, gamma_init=gamma_init, gamma_after=gamma_after)
    return module


# --------------------------------------------------------------------------------------------
# Dynamic transforms (Table 5)
# --------------------------------------------------------------------------------------------


class DynamicMatching:
    """Re-matches a :class:`ChannelTransform` during distillation (Table 5's dynamic transform).

    The training loop shows it the teacher and student features of its pair at every main-stage
    forward (:meth:`observe`); after every ``every``-th iteration (:meth:`after_step`) it
    replaces the transform's channel map, in place, with the ``strategy`` matching on the
    ``metric`` consistency of the features seen since the previous re-match (at least two
    samples), and starts recording afresh. Under ``torch.distributed`` every rank takes rank
    0's map. The transform file itself is never changed.
    """

    def __init__(self, transform: ChannelTransform, every: int, metric: str = "correlation",
                 strategy: str = "bipartite") -> None:
        if not isinstance(transform, ChannelTransform):
            raise KcdError("distill.dynamic_every needs a channel transform file per pair")
        if not isinstance(every, int) or every < 1:
            raise KcdError(f"distill.dynamic_every must be a positive integer, got {every!r}")
        self.transform = transform
        self.every = every
        self.metric = metric
        self.strategy = strategy
        self.stats = self._fresh()

    def _fresh(self) -> ConsistencyStatistics:
        return ConsistencyStatistics(self.transform.c_t, self.transform.c_s, metrics=[self.metric])

    def observe(self, teacher: Tensor, student: Tensor) -> None:
        """Record one batch of the pair's teacher and student features (pooled per channel)."""
        self.stats.update(global_avg_pool(teacher).detach().float().cpu(),
                          global_avg_pool(student).detach().float().cpu())

    def after_step(self, iteration: int) -> None:
        """Re-match after main-stage iteration ``iteration`` (0-based) when it ends a period."""
        if (iteration + 1) % self.every == 0:
            self.rematch()

    def rematch(self) -> None:
        """Replace the channel map from the recorded features, then reset the record."""
        if self.stats.n < 2:
            return
        new = match(self.stats.matrix(self.metric), self.strategy)
        index = self.transform.index
        index.copy_(new.to(index.device))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(index, src=0)  # every rank follows rank 0's match
        self.stats = self._fresh()

    def state_dict(self) -> dict:
        """The features recorded since the last re-match (the map is the transform's buffer)."""
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------

_META_TYPES = (str, int, float, bool, type(None))


def _payload(transform: nn.Module) -> dict:
    """Plain-dictionary form of a transform (tensors, str, int, float, None)."""
    for key, value in transform.meta.items():
        if not isinstance(key, str) or not isinstance(value, _META_TYPES):
            raise KcdError(
                f"transform meta '{key}' is a {type(value).__name__}; "
                "meta values must be str, int, float, bool or None"
            )
    common = {"c_t": transform.c_t, "c_s": transform.c_s, "meta": dict(transform.meta)}
    if isinstance(transform, ChannelTransform):
        return {"kind": "channel", "index": transform.index.cpu().clone(), **common}
    if isinstance(transform, LearnedTransform):
        state = {key: value.cpu().clone() for key, value in transform.state_dict().items()}
        return {"kind": transform.kind, "state_dict": state, **common}
    if isinstance(transform, PerClassTransform):
        return {"kind": "per-class", "num_classes": transform.num_classes,
                "transforms": [_payload(t) for t in transform.transforms], **common}
    raise KcdError(f"cannot save a {type(transform).__name__}; expected a kcd transform")


def _from_payload(payload: dict) -> nn.Module:
    kind = payload["kind"]
    meta = payload["meta"]
    if kind == "channel":
        return ChannelTransform(payload["index"], payload["c_t"], meta=meta)
    if kind in LEARNED_KINDS:
        module = LearnedTransform(kind, payload["c_t"], payload["c_s"], meta=meta)
        module.load_state_dict(payload["state_dict"])
        return module.eval().requires_grad_(False)
    if kind == "per-class":
        children = [_from_payload(child) for child in payload["transforms"]]
        return PerClassTransform(children, payload["num_classes"], meta=meta)
    raise KcdError(f"unknown transform kind '{kind}'")


def save_transform(transform: nn.Module, path: str | os.PathLike) -> None:
    """Write a transform with its metadata to ``path`` atomically (``weights_only``-loadable)."""
    atomic_save({"format": _TRANSFORM_FORMAT, **_payload(transform)}, path)


def check_transform(t: nn.Module, path: str | os.PathLike, *, teacher: str | None,
                    student: str, layer: str | None = None, c_t: int | None = None,
                    c_s: int | None = None) -> None:
    """Refuse a transform made for another pair, another student layer or other channel
    counts, naming its file (its metadata records the pair it was made for)."""
    meta = getattr(t, "meta", {}) or {}
    for key, expected in (("student", student), ("teacher", teacher), ("layer", layer)):
        if meta.get(key) and expected and meta[key] != expected:
            raise KcdError(f"transform {path} was made for {key} {meta[key]}, not {expected}; "
                           "make it from this pair's statistics")
    if (c_t is not None and t.c_t != c_t) or (c_s is not None and t.c_s != c_s):
        at = f" at student layer {layer}" if layer else ""
        raise KcdError(f"transform {path} maps {t.c_t}->{t.c_s} channels but the pair{at} "
                       f"needs {c_t}->{c_s}")


def load_transform(path: str | os.PathLike) -> nn.Module:
    """Read a transform written by :func:`save_transform`, in eval mode."""
    payload = load_format(path, _TRANSFORM_FORMAT)
    try:
        return _from_payload(payload).eval()
    except (KeyError, TypeError, RuntimeError, KcdError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KcdError(f"{path} is not a valid {_TRANSFORM_FORMAT} file: {reason}") from None
