"""Channel overlap of the most activated channels per class (paper Section 5.1, Table 10).

For a model's distilled-layer feature maps over a split, each map is global-average-pooled
(b x c) and averaged per class: the *class channel means*, a classes x channels matrix
(:func:`class_channel_means`). For two models A and B and each class, the top-k channel indices
of A's and B's rows are intersected; the overlap ratio ``|top_k(A_c) ∩ top_k(B_c)| / k`` is
averaged over the classes (:func:`topk_overlap`) and reported in percent for several k
(:func:`overlap_table`). The paper's rows are "S vs T", "S1 vs S2" (two students trained from
different seeds) and "S vs T(T)" (T(T): the teacher's maps after the KCD transform).

Conventions:

- Classes without any image in the data get a NaN row in :func:`class_channel_means`; the
  overlap averages over the classes whose rows are finite in both matrices.
- Ties among activations are broken towards the lower channel index (a stable sort), so the
  result is deterministic.
- ``k`` is a channel count (int >= 1) or a fraction of the compared channel count (float in
  (0, 1), rounded half up, at least 1). Columns are named ``top10`` and ``top5%``.

Unequal channel counts (our interpretation; the paper does not say how). Channel indices are
compared in the student's channel space. A transformed teacher is already there (a transform
outputs c_S channels). For the raw teacher with c_T > c_S channels (ResNet-50's 2048 vs
MobileNetV2-0.5x's 1280), we keep its leading c_S channels, ``teacher[:, :c_S]``: the identity
pairing that the transform replaces, the one plain feature distillation would use if the channel
counts agreed. The top-k is then taken among those c_S channels. :func:`leading_channels` is the
one place this rule lives; Figure 1 (:mod:`kcd.analysis.activation_maps`) uses it too.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from kcd.errors import KcdError
from kcd.features import FeatureTap, global_avg_pool
from kcd.tables import overlap_column as column_name

Batches = Iterable[tuple[Tensor, Tensor]]


def leading_channels(x: Tensor, channels: int, dim: int = 1) -> Tensor:
    """``x`` cut to its first ``channels`` channels along ``dim``: a wider raw teacher seen in the
    student's channel space (see the module docstring). Narrower inputs are refused."""
    if x.shape[dim] < channels:
        raise KcdError(
            f"cannot compare {x.shape[dim]} channels in a space of {channels} channels; "
            "pass the wider (teacher) maps first or a transform that maps them to the student"
        )
    return x.narrow(dim, 0, channels)


def _check_labels(labels: Tensor, num_classes: int) -> Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise KcdError(
            f"labels {int(labels.min())}..{int(labels.max())} fall outside 0..{num_classes - 1}; "
            "pass the dataset's number of classes"
        )
    return labels


@torch.no_grad()
def layer_features(
    model: nn.Module,
    layer: str,
    batches: Batches,
    num_classes: int,
    transform: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Iterable[tuple[Tensor, Tensor]]:
    """Yield ``(features, labels)`` of each batch: the model's ``layer`` maps (b x c x h x w), after
    ``transform(maps, labels)`` when given, on ``device``; labels are checked against ``num_classes``.

    The model runs in eval mode without gradients; each submodule's mode is restored at the end.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval().to(device)
    if transform is not None:
        transform.eval().to(device)
    try:
        with FeatureTap(model, [layer]) as tap:
            for images, labels in batches:
                labels = _check_labels(labels, num_classes).to(device)
                model(images.to(device))
                features = tap.features[tap.layers[0]]
                if transform is not None:
                    features = transform(features, labels)
                yield features, labels
    finally:
        for module, training in modes.items():
            module.training = training


def class_channel_means(
    model: nn.Module,
    layer: str,
    batches: Batches,
    num_classes: int,
    transform: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Class-averaged pooled activation per channel: float64 CPU tensor of num_classes x c.

    Each ``layer`` map (after ``transform(maps, labels)`` when given: "T(T)") is globally
    average-pooled, then averaged over the images of each class. Rows of classes absent from
    ``batches`` are NaN, so :func:`topk_overlap` leaves them out.
    """
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for features, labels in layer_features(model, layer, batches, num_classes, transform, device):
        pooled = global_avg_pool(features).double().cpu()
        labels = labels.cpu()
        if sums is None:
            sums = torch.zeros(num_classes, pooled.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels, pooled)
        counts += torch.bincount(labels, minlength=num_classes).double()
    if sums is None or counts.sum() == 0:
        raise KcdError("the evaluation data held no images; check the dataset root and split")
    return sums / counts[:, None].where(counts[:, None] > 0, torch.tensor(math.nan))


def resolve_k(k: int | float, channels: int) -> int:
    """The channel count a ``k`` stands for: an int as is, a fraction in (0, 1) of ``channels``
    rounded half up and at least 1. Raises KcdError for k <= 0, fractions >= 1, or k > channels."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise KcdError(f"top-k must be a channel count or a fraction in (0, 1), got {k!r}")
    if isinstance(k, float):
        if not 0 < k < 1:
            raise KcdError(f"top-k fraction must lie in (0, 1), got {k}; give counts as integers")
        count = max(1, math.floor(k * channels + 0.5))
    else:
        count = k
    if count < 1:
        raise KcdError(f"top-k must be at least 1, got k={k}")
    if count > channels:
        raise KcdError(f"top-k k={k} exceeds the channel count {channels}; choose k <= {channels}")
    return count


def _topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean classes x channels mask of each row's k largest entries (ties: lower index)."""
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)


def topk_overlap(a: Tensor, b: Tensor, k: int | float) -> float:
    """Mean over classes of ``|top_k(a_c) ∩ top_k(b_c)| / k`` in percent.

    ``a`` and ``b`` are classes x channels (e.g. from :func:`class_channel_means`); the wider one
    is cut to the narrower one's leading channels (module docstring). Classes with a non-finite
    row in either matrix are left out.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise KcdError(
            f"overlap needs two classes x channels matrices with the same classes, "
            f"got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    channels = min(a.shape[1], b.shape[1])
    a, b = leading_channels(a, channels), leading_channels(b, channels)
    count = resolve_k(k, channels)
    present = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    if not present.any():
        raise KcdError("no class has activations in both models; check that the data has labels")
    a, b = a[present], b[present]
    shared = (_topk_mask(a, count) & _topk_mask(b, count)).sum(1).double()
    return float((shared / count).mean() * 100)


def overlap_table(
    means: Mapping[str, Tensor],
    pairs: Sequence[tuple[str, str, str]],
    ks: Sequence[int | float],
) -> list[dict]:
    """Table 10: one row ``{"models": label, "top10": percent, ...}`` per ``(label, a, b)`` pair.

    ``means`` maps model names (e.g. ``"S"``, ``"T"``, ``"T(T)"``) to class channel means;
    each pair compares ``means[a]`` with ``means[b]`` under :func:`topk_overlap` for every k.
    """
    if not ks:
        raise KcdError("give at least one top-k, e.g. [10, 20, 50, 100]")
    columns = [column_name(k) for k in ks]
    if len(set(columns)) != len(columns):
        raise KcdError(f"top-k values repeat: {', '.join(columns)}")
    rows = []
    for label, first, second in pairs:
        for name in (first, second):
            if name not in means:
                raise KcdError(
                    f"overlap pair '{label}' names '{name}', which has no class channel means; "
                    f"known: {', '.join(means)}"
                )
        row: dict = {"models": label}
        for k, column in zip(ks, columns):
            row[column] = topk_overlap(means[first], means[second], k)
        rows.append(row)
    return rows


def overlap_job(*, data: dict, num_classes: int, models: dict[str, dict], pairs: list,
                ks: list, out: str, split: str = "train", batch_size: int = 256,
                progress: bool = True) -> list[dict]:
    """Table 10 as a pipeline job: class channel means of every named model over ``split``
    (the paper averages the training data per class), the overlap rows, written to ``out`` as
    ``{label: {column: percent}}``."""
    from tqdm import tqdm

    from kcd.analysis import default_layer, load_view
    from kcd.checkpoint import atomic_write_json
    from kcd.data.streams import eval_batches
    from kcd.specs import DataSpec, from_dict

    spec = from_dict(DataSpec, data)
    batches = eval_batches(spec, batch_size, split=split)
    means = {}
    for name, ref in tqdm(models.items(), desc="class channel means", disable=not progress):
        model, transform = load_view(ref, num_classes)
        means[name] = class_channel_means(model, default_layer(ref["arch"]), batches,
                                          num_classes, transform)
    rows = overlap_table(means, [tuple(p) for p in pairs], ks)
    atomic_write_json({r["models"]: {k: v for k, v in r.items() if k != "models"} for r in rows},
                      out)
    return rows
