"""Consistency statistics and channel transforms (Algorithm 1, steps 4-5).

:func:`compute_statistics` makes one pass over the training images (evaluation transforms,
no augmentation) through a teacher and a student, pools the distilled layer's feature maps and
accumulates the sufficient statistics of every requested metric at once, globally and, for
Table 6, per group of classes. :func:`make_transform` turns a statistics file into a channel
transform file for a (strategy, metric); :func:`learn_transform` fits the learned sub-network
strategies, which need the feature maps themselves.

Memory: each accumulator holds a few c_T x c_S float64 matrices, independent of the number of
images; per-class statistics for K groups hold K of them (K x c_T x c_S x 8 bytes per matrix).
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from kcd.checkpoint import atomic_save, load_file
from kcd.consistency import ConsistencyStatistics
from kcd.data.datasets import check_num_classes
from kcd.errors import KcdError
from kcd.features import FeatureTap, global_avg_pool
from kcd.specs import DataSpec, StatisticsSpec
from kcd.transforms import (
    LEARNED_KINDS,
    PerClassTransform,
    build_transform,
    fit_learned_transform,
    label_groups,
    save_transform,
)



FEATURE_CACHE_BYTES = 512 * 2**20  # learned transforms: replay the maps when they fit


def _models(teacher: str, teacher_weights: str, student: str, student_weights: str,
            num_classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    from kcd.checkpoint import load_model  # the engines' heavy imports stay out of `kcd transform`

    t = load_model(teacher, teacher_weights, num_classes, "teacher weights").to(device).eval()
    s = load_model(student, student_weights, num_classes, "student weights").to(device).eval()
    return t, s


def _feature_pairs(
    teacher: nn.Module, student: nn.Module, layers: tuple[str, str], data: DataSpec,
    batch_size: int, device: torch.device, split: str = "train", progress: bool = False,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (teacher map, student map, labels) for every batch of ``split``."""
    from kcd.data.streams import eval_batches

    with FeatureTap(teacher, [layers[0]]) as tt, FeatureTap(student, [layers[1]]) as st:
        for x, y in tqdm(eval_batches(data, batch_size, split=split, limit=limit), desc="features",
                         disable=not progress, leave=False):
            x = x.to(device)
            with torch.no_grad():
                teacher(x)
                student(x)
            yield tt.features[layers[0]], st.features[layers[1]], y


def compute_statistics(spec: StatisticsSpec, progress: bool = True) -> dict:
    """One pass over the training set; writes the statistics file and returns a summary."""
    teacher, student, groups, num_classes = spec.teacher, spec.student, spec.groups, spec.num_classes
    layers, data, metrics = (spec.layers[0], spec.layers[1]), spec.data, spec.metrics
    for k in groups:
        if not 1 <= k <= num_classes:
            raise KcdError(f"groups K={k} must be between 1 and the class count {num_classes}")
    check_num_classes(data.name, data.root, num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = _models(teacher, spec.teacher_weights, student, spec.student_weights, num_classes,
                   device)
    stats: ConsistencyStatistics | None = None
    per_group: dict[int, list[ConsistencyStatistics]] = {}
    for ft, fs, y in _feature_pairs(t, s, layers, data, spec.batch_size, device,
                                    progress=progress, limit=spec.max_images):
        pt, ps = global_avg_pool(ft).float().cpu(), global_avg_pool(fs).float().cpu()
        if stats is None:
            stats = ConsistencyStatistics(pt.shape[1], ps.shape[1], metrics=list(metrics))
            per_group = {k: [ConsistencyStatistics(pt.shape[1], ps.shape[1],
                                                   metrics=list(spec.group_metrics))
                             for _ in range(k)] for k in groups if k > 1}
        stats.update(pt, ps)
        for k, accs in per_group.items():
            g = label_groups(y, k, num_classes)
            for gi in g.unique().tolist():
                sel = g == gi
                accs[gi].update(pt[sel], ps[sel])
    if stats is None:
        raise KcdError(f"the training split of {data.name} at {data.root} is empty")
    atomic_save(
        {
            "kind": "kcd-statistics",
            "teacher": teacher,
            "student": student,
            "layers": list(layers),
            "num_classes": num_classes,
            "global": stats.state_dict(),
            "groups": {str(k): [a.state_dict() for a in accs] for k, accs in per_group.items()},
        },
        spec.out,
    )
    return {"samples": stats.n, "c_t": stats.c_t, "c_s": stats.c_s, "groups": sorted(per_group)}


STATISTICS_KEYS = ("teacher", "student", "layers", "num_classes", "global", "groups")
"""What a statistics file holds besides its ``kind`` (written above)."""


def _load_statistics(path: str | os.PathLike) -> dict:
    obj = load_file(path, "statistics")
    if not isinstance(obj, dict) or obj.get("kind") != "kcd-statistics":
        raise KcdError(f"{path} is not a kcd statistics file; run `kcd statistics` to make one")
    missing = [k for k in STATISTICS_KEYS if k not in obj]
    if missing:
        raise KcdError(f"statistics {path} lack {', '.join(missing)} (a damaged or foreign "
                       "file); delete it and rerun `kcd statistics`")
    if not _all_finite(obj):
        raise KcdError(f"statistics {path} hold NaN or inf values (a diverged model or a "
                       "damaged file); delete it and rerun `kcd statistics`")
    return obj


def _all_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _matrix(state: dict, metric: str, path: str | os.PathLike) -> torch.Tensor:
    """The consistency matrix of ``metric`` from one accumulator state of a statistics file."""
    try:
        return ConsistencyStatistics.from_state_dict(state).matrix(metric)
    except (KeyError, TypeError, RuntimeError, KcdError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KcdError(f"statistics {path} cannot give the {metric} matrix ({reason}); delete "
                       "it and rerun `kcd statistics`") from None


def pair_matrix(stats_path: str | os.PathLike, metric: str) -> tuple[torch.Tensor, dict]:
    """(the ``metric`` consistency matrix over all images, the file's pair: teacher,
    student, layers) of a statistics file."""
    obj = _load_statistics(stats_path)
    pair = {"teacher": obj["teacher"], "student": obj["student"], "layers": obj["layers"]}
    return _matrix(obj["global"], metric, stats_path), pair


def make_transform(
    stats_path: str | os.PathLike,
    strategy: str,
    metric: str,
    out: str | os.PathLike,
    *,
    groups: int = 1,
    seed: int = 0,
) -> dict:
    """Write the channel transform of (strategy, metric) from a statistics file.

    ``groups`` > 1 builds Table 6's per-class transforms: one per equal group of labels.
    Returns the transform's metadata (including Γ before and after).
    """
    if strategy in LEARNED_KINDS:
        raise KcdError(f"strategy '{strategy}' is learned from features; use learn_transform")
    obj = _load_statistics(stats_path)
    meta = {"teacher": obj["teacher"], "student": obj["student"], "layer": obj["layers"][1],
            "teacher_layer": obj["layers"][0], "metric": metric, "strategy": strategy,
            "groups": groups}
    if groups <= 1:
        m = _matrix(obj["global"], metric, stats_path)
        t = build_transform(m, strategy, seed=seed, meta=meta)
    else:
        states = obj["groups"].get(str(groups))
        if states is None:
            raise KcdError(f"{stats_path} has no statistics for K={groups} groups; "
                           f"it has K in {sorted(obj['groups']) or 'none'}")
        parts = [build_transform(_matrix(st, metric, stats_path), strategy, seed=seed + i,
                                 meta=dict(meta, group=i)) for i, st in enumerate(states)]
        t = PerClassTransform(parts, obj["num_classes"])
        t.meta = dict(meta, gamma_after=sum(p.meta["gamma_after"] for p in parts) / len(parts),
                      gamma_before=_mean_or_none([p.meta.get("gamma_before") for p in parts]))
    save_transform(t, out)
    return dict(t.meta)


def learn_transform(
    *,
    strategy: str,
    metric: str,
    teacher: str,
    teacher_weights: str,
    student: str,
    student_weights: str,
    layers: tuple[str, str],
    data: DataSpec,
    num_classes: int,
    out: str | os.PathLike,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit a learned transform (Sub-net-FC / Sub-net-Res, Section 3.3) and write it."""
    if strategy not in LEARNED_KINDS:
        raise KcdError(f"learn_transform is for {', '.join(LEARNED_KINDS)}; got '{strategy}'")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t, s = _models(teacher, teacher_weights, student, student_weights, num_classes, device)

    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The first pass keeps the feature maps while they fit in FEATURE_CACHE_BYTES; later
        # passes replay them instead of running both networks again (the demo's whole set fits;
        # at paper scale the maps stream).
        cache: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0
        for ft, fs, _ in _feature_pairs(t, s, layers, data, batch_size, device):
            pair = (ft.detach().float(), fs.detach().float())
            if cache is not None:
                size += sum(x.numel() * x.element_size() for x in pair)
                if size <= FEATURE_CACHE_BYTES:
                    cache.append(pair)
                else:
                    cache = None
            yield pair
        while True:
            if cache:
                yield from cache
            else:
                for ft, fs, _ in _feature_pairs(t, s, layers, data, batch_size, device):
                    yield ft.detach().float(), fs.detach().float()

    module = fit_learned_transform(strategy, pairs(), metric=metric, steps=steps, lr=lr, seed=seed)
    module.meta.update({"teacher": teacher, "student": student, "layer": layers[1],
                        "teacher_layer": layers[0], "metric": metric, "strategy": strategy})
    save_transform(module.cpu(), out)
    return dict(module.meta)


def _mean_or_none(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
