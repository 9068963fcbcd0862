"""Names of channel transforms in the pipeline's runs: what a run's ``transform`` folder means.

A distillation run's folder names the transform it uses (``runs/<T>-s<t>__<S>/<method>/<name>``):

``none``
    no transform (the classic method).
``<strategy>-<metric>``
    the transform of that strategy and consistency metric, computed for the run's own pair
    (its teacher seed, its student seed, trained weights): Algorithm 1 as written. Strategies
    are ``identity``, ``random``, ``greedy``, ``bipartite`` (from statistics) and ``subnet-fc``,
    ``subnet-res`` (learned).
``...-k<K>``
    K per-class transforms, one per equal group of labels (Table 6; K > 1).
``...@<source>``
    the same transform computed for another pair (Tables 3 and 4):
    ``@t<N>``: with the teacher of seed N instead of the run's teacher (Table 3b);
    ``@s<N>``: with the student of seed N instead of the run's student (Table 3a);
    ``@init-s`` / ``@init-t`` / ``@init-st``: from the initial weights (theta0) of the
    student / the teacher / both instead of the trained ones (Table 4).
``...+dyn``
    recomputed every E iterations during distillation from the student's recorded features
    (Table 5's Dynamic; the name is the transform it starts from).

The strategies and metrics are named here, once, with their table labels (:data:`STRATEGIES`,
:data:`METRICS`): this module imports no torch, so the workflow's wildcard constraints, the
config checks and the tables derive from it without importing the implementations. Each name
has one implementation, registered under the same name: the matching in
:data:`kcd.transforms.STRATEGIES`, the formulas in :data:`kcd.consistency.METRICS` (each
checks on import that it implements exactly the names listed here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kcd.errors import KcdError
from kcd.registry import Registry

NO_TRANSFORM = "none"


@dataclass(frozen=True)
class Strategy:
    """A transform strategy's name, its label in the tables, and whether it is learned from
    the pair's features (a sub-network) rather than matched on a consistency matrix."""

    name: str
    label: str
    learned: bool = False


STRATEGIES: Registry[Strategy] = Registry("transform strategy")
for _s in (Strategy("identity", "Identity"), Strategy("random", "Random Transformation"),
           Strategy("bipartite", "Bipartite"), Strategy("greedy", "Greedy"),
           Strategy("subnet-fc", "Sub-net-FC", learned=True),
           Strategy("subnet-res", "Sub-net-Res", learned=True)):
    STRATEGIES.register(_s.name, _s)

METRICS: Registry[str] = Registry("consistency metric")  # name -> its label in the tables
for _name, _label in (("l1", "L1"), ("l2", "L2"), ("cosine", "Cosine"),
                      ("correlation", "Correlation"), ("kl", "KL Divergence")):
    METRICS.register(_name, _label)

MATCHED_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if not s.learned)  # on statistics
LEARNED_STRATEGIES = tuple(n for n, s in STRATEGIES.items() if s.learned)  # on features
STRATEGY_NAMES = MATCHED_STRATEGIES + LEARNED_STRATEGIES
METRIC_NAMES = tuple(METRICS)


def check_implemented(kind: str, names: Registry[str] | tuple[str, ...],
                      implemented: list[str] | tuple[str, ...], home: str) -> None:
    """Refuse a registry of implementations that is not exactly the names listed here."""
    missing, extra = set(names) - set(implemented), set(implemented) - set(names)
    if missing or extra:
        raise KcdError(f"{home} implements {kind}s {sorted(implemented)} but kcd/naming.py "
                       f"names {sorted(names)}; register each {kind} in both")


SOURCES = ("init-s", "init-t", "init-st")

_PATTERN = re.compile(
    r"^(?P<strategy>" + "|".join(STRATEGY_NAMES) + r")-(?P<metric>" + "|".join(METRIC_NAMES)
    + r")(?:-k(?P<groups>[2-9]|[1-9]\d+))?(?:@(?P<source>t\d+|s\d+|" + "|".join(SOURCES) + r"))?"
    r"(?P<dynamic>\+dyn)?$"
)
# The same grammar as a Snakemake wildcard constraint (no anchors, no named groups).
WILDCARD = NO_TRANSFORM + "|" + re.sub(r"\?P<\w+>", "", _PATTERN.pattern[1:-1])
# Transform file names (:attr:`TransformName.file_name`), as wildcard constraints: those
# computed from statistics (with K groups) and the learned ones.
_METRICS = "(" + "|".join(METRIC_NAMES) + ")"
STATS_FILE_WILDCARD = ("(" + "|".join(MATCHED_STRATEGIES) + ")-" + _METRICS
                       + r"(-k([2-9]|[1-9]\d+))?")
LEARNED_FILE_WILDCARD = "(" + "|".join(LEARNED_STRATEGIES) + ")-" + _METRICS


@dataclass(frozen=True)
class TransformName:
    strategy: str
    metric: str
    groups: int = 1
    source: str | None = None  # None: the run's own pair, trained weights
    dynamic: bool = False

    @property
    def file_name(self) -> str:
        """The transform file's name in its pair's folder (source and dynamic excluded)."""
        k = f"-k{self.groups}" if self.groups > 1 else ""
        return f"{self.strategy}-{self.metric}{k}"

    def __str__(self) -> str:
        src = f"@{self.source}" if self.source else ""
        return self.file_name + src + ("+dyn" if self.dynamic else "")

    def with_(self, **changes) -> "TransformName":
        return TransformName(**{**self.__dict__, **changes})


def parse_transform_name(name: str) -> TransformName | None:
    """``None`` for ``none``; otherwise the parts of ``name`` (see the module docstring)."""
    if name == NO_TRANSFORM:
        return None
    m = _PATTERN.match(name)
    if not m:
        raise KcdError(
            f"'{name}' is not a transform name; expected <strategy>-<metric>[-k<K>, K >= 2]"
            f"[@t<N>|@s<N>|@init-s|@init-t|@init-st][+dyn], e.g. bipartite-correlation"
        )
    groups = int(m["groups"]) if m["groups"] else 1
    return TransformName(m["strategy"], m["metric"], groups, m["source"], bool(m["dynamic"]))


# a weight tag names a trained model (s<seed>) or, with this suffix, theta0 (s<seed>-init)
THETA0_TAG_SUFFIX = "-init"


def source_pair(name: TransformName, teacher_seed: int, seed: int) -> tuple[str, str]:
    """The (teacher, student) weight tags whose statistics make the transform of a run with
    seeds (teacher_seed, seed): ``s<N>`` for trained weights, ``s<N>-init`` for theta0."""
    t, s = f"s{teacher_seed}", f"s{seed}"
    src = name.source
    if src is None:
        return t, s
    if src.startswith("t") and src[1:].isdigit():
        return f"s{src[1:]}", s
    if src.startswith("s") and src[1:].isdigit():
        return t, f"s{src[1:]}"
    return (t + THETA0_TAG_SUFFIX if src in ("init-t", "init-st") else t,
            s + THETA0_TAG_SUFFIX if src in ("init-s", "init-st") else s)
