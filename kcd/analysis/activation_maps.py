"""Class-averaged activation maps of the distilled layer (paper Figure 1).

For one class, a model's ``layer`` maps (c x h x w, after the transform for the transformed
teacher) are averaged over the class's images (:func:`class_activation_map`). The figure
(:func:`plot_activation_maps`) shows seven panels: S1, S2 (two students from different seeds),
T, Transformed T, and the differences T - S1, Transformed T - S1, S1 - S2. The paper draws the
CIFAR-100 class "boy" with ResNet20 students and a ResNet56 teacher at layer3 (64 channels of
8 x 8).

Each panel tiles its c channel maps in a grid, channel ``i`` at row ``i // cols``, column
``i % cols``. 64 channels give the paper's 8 x 8 grid; other counts use the smallest near-square
grid that holds them: ``cols = ceil(sqrt(c))``, ``rows = ceil(c / cols)`` (e.g. 10 channels:
3 rows of 4, two cells blank). Activation panels share one colour scale, difference panels one
symmetric diverging scale, so panels can be compared by colour.

A raw teacher with more channels than the students is shown by its leading c_S channels, the
rule of :func:`kcd.analysis.overlap.leading_channels`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from kcd.analysis.overlap import Batches, layer_features, leading_channels
from kcd.checkpoint import atomic_write_with
from kcd.errors import KcdError

PANELS: tuple[str, ...] = (
    "S1", "S2", "T", "Transformed T", "T - S1", "Transformed T - S1", "S1 - S2",
)
"""Panel titles of Figure 1: four activation maps, then three differences."""

_ACTIVATION_PANELS = PANELS[:4]


def check_class(class_index: int, num_classes: int) -> int:
    """``class_index`` if it lies in 0..num_classes-1, else a KcdError naming it."""
    if isinstance(class_index, bool) or not isinstance(class_index, int) \
            or not 0 <= class_index < num_classes:
        raise KcdError(
            f"class {class_index!r} is not a class index of this dataset; use 0..{num_classes - 1}"
        )
    return class_index


def class_activation_map(
    model: nn.Module,
    layer: str,
    batches: Batches,
    class_index: int,
    num_classes: int,
    transform: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Mean ``layer`` map (float64 CPU, c x h x w) over the images of ``class_index`` in ``batches``,
    after ``transform(maps, labels)`` when given."""
    check_class(class_index, num_classes)
    total: Tensor | float = 0.0
    count = 0
    for features, labels in layer_features(model, layer, batches, num_classes, transform, device):
        chosen = labels == class_index
        if chosen.any():
            total = total + features[chosen].double().sum(0).cpu()
            count += int(chosen.sum())
    if count == 0:
        raise KcdError(f"class {class_index} has no images in the data; choose another class")
    return total / count


def figure_panels(s1: Tensor, s2: Tensor, t: Tensor, transformed_t: Tensor) -> dict[str, Tensor]:
    """The seven panels of Figure 1 (:data:`PANELS` -> c_S x h x w) from the four class maps.

    ``t`` may have more channels than the students: its leading c_S channels are used.
    """
    maps = [torch.as_tensor(m).detach().double().cpu() for m in (s1, s2, t, transformed_t)]
    if any(m.dim() != 3 for m in maps):
        raise KcdError(f"activation maps must be c x h x w, got shapes {[tuple(m.shape) for m in maps]}")
    s1, s2, t, tt = maps
    t = leading_channels(t, s1.shape[0], dim=0)
    if not s1.shape == s2.shape == t.shape == tt.shape:
        raise KcdError(
            "S1, S2, T and Transformed T maps must share c_S x h x w, got "
            + ", ".join(str(tuple(m.shape)) for m in (s1, s2, t, tt))
        )
    values = (s1, s2, t, tt, t - s1, tt - s1, s1 - s2)
    return dict(zip(PANELS, values))


def channel_grid(channels: int) -> tuple[int, int]:
    """(rows, cols) of the smallest near-square grid for ``channels`` maps: 64 -> (8, 8)."""
    cols = math.ceil(math.sqrt(channels))
    return math.ceil(channels / cols), cols


def tile_channels(maps: Tensor, pad: int = 1) -> Tensor:
    """One 2-D image of the c x h x w ``maps`` tiled by :func:`channel_grid`; ``pad`` NaN pixels
    separate the tiles and fill unused cells (drawn blank)."""
    c, h, w = maps.shape
    rows, cols = channel_grid(c)
    image = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad), math.nan,
                       dtype=torch.float64)
    for i in range(c):
        top, left = (i // cols) * (h + pad), (i % cols) * (w + pad)
        image[top:top + h, left:left + w] = maps[i]
    return image


def plot_activation_maps(
    s1: Tensor,
    s2: Tensor,
    t: Tensor,
    transformed_t: Tensor,
    out_prefix: str | os.PathLike,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Draw Figure 1 from four class maps and write ``<prefix>.png`` and ``<prefix>.pdf``
    atomically; returns their paths. Uses matplotlib's Agg renderer, no display or pyplot."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = figure_panels(s1, s2, t, transformed_t)
    tiles = {name: tile_channels(value).numpy() for name, value in panels.items()}
    high = max(float(panels[n].max()) for n in _ACTIVATION_PANELS)
    low = min(float(panels[n].min()) for n in _ACTIVATION_PANELS)
    spread = max(float(panels[n].abs().max()) for n in PANELS[4:]) or 1.0
    scales = {
        "activation": (colormaps["viridis"].with_extremes(bad="white"), low, high),
        "difference": (colormaps["RdBu_r"].with_extremes(bad="white"), -spread, spread),
    }

    fig = Figure(figsize=(16, 8.5), layout="constrained")
    axes = fig.subplots(2, 4)
    images = {}
    for ax, name in zip(axes.flat, PANELS):
        kind = "activation" if name in _ACTIVATION_PANELS else "difference"
        cmap, vmin, vmax = scales[kind]
        images[kind] = ax.imshow(tiles[name], cmap=cmap, vmin=vmin, vmax=vmax,
                                 interpolation="nearest")
        ax.set_title(name)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, kind in enumerate(("activation", "difference")):  # one colour bar per row
        fig.colorbar(images[kind], ax=axes[row, :], shrink=0.8)
    c, h, w = panels["S1"].shape
    rows, cols = channel_grid(c)
    fig.suptitle(f"{title or 'class-averaged activations'}: {c} channels of {h}x{w}, "
                 f"tiled {rows}x{cols}")

    prefix = Path(out_prefix)
    png, pdf = prefix.with_suffix(".png"), prefix.with_suffix(".pdf")
    atomic_write_with(png, lambda f: fig.savefig(f, format="png", dpi=150))
    atomic_write_with(pdf, lambda f: fig.savefig(f, format="pdf", metadata={"CreationDate": None}))
    return png, pdf


def activation_figure(
    students: tuple[nn.Module, nn.Module],
    teacher: nn.Module,
    transform: nn.Module,
    layers: tuple[str, str],
    batches: Iterable[tuple[Tensor, Tensor]],
    class_index: int,
    num_classes: int,
    out_prefix: str | os.PathLike,
    title: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Path, Path]:
    """Figure 1 end to end: class maps of S1, S2, T and T(T) for ``class_index``, then the plot.

    ``layers`` is (teacher layer, student layer). ``batches`` is read once per map, so it must be
    re-iterable (a list or a DataLoader, as :func:`kcd.data.streams.eval_batches` returns).
    """
    check_class(class_index, num_classes)
    if iter(batches) is batches:
        raise KcdError("batches must be re-iterable (a list or a DataLoader), not an iterator")
    teacher_layer, student_layer = layers
    s1, s2 = (class_activation_map(s, student_layer, batches, class_index, num_classes,
                                   device=device) for s in students)
    t = class_activation_map(teacher, teacher_layer, batches, class_index, num_classes,
                             device=device)
    tt = class_activation_map(teacher, teacher_layer, batches, class_index, num_classes,
                              transform=transform, device=device)
    return plot_activation_maps(s1, s2, t, tt, out_prefix,
                                title=title or f"class {class_index}")


def resolve_class(class_: int | str, class_names: Sequence[str] | None, num_classes: int) -> int:
    """A configured Figure 1 class (an index, or a name of the dataset's classes) as an index."""
    if isinstance(class_, str) and not class_.isdigit():
        if not class_names or class_ not in class_names:
            known = ", ".join(list(class_names or [])[:8])
            raise KcdError(f"config key figure1.class: '{class_}' is not a class of the dataset"
                           + (f"; its classes begin {known}, ..." if known else
                              "; give a class index instead"))
        return list(class_names).index(class_)
    index = int(class_)
    if not 0 <= index < num_classes:
        raise KcdError(f"config key figure1.class: class {index} does not exist; "
                       f"use 0..{num_classes - 1}")
    return index


def figure1_job(*, data: dict, num_classes: int, models: dict[str, dict], class_: int | str,
                out: str, split: str = "train", batch_size: int = 256) -> tuple[Path, Path]:
    """Figure 1 as a pipeline job: ``models`` holds S1, S2, T and T(T) (the teacher with the
    transform computed for S1); writes ``<out>.png`` and ``<out>.pdf``."""
    from kcd.analysis import default_layer, load_view
    from kcd.data.datasets import build_dataset
    from kcd.data.streams import eval_batches
    from kcd.specs import DataSpec, from_dict

    spec = from_dict(DataSpec, data)
    dataset = build_dataset(spec.name, spec.root, split, train_transform=False,
                            image_size=spec.image_size)
    index = resolve_class(class_, getattr(dataset, "classes", None), num_classes)
    names = getattr(dataset, "classes", None)
    label = names[index] if names else str(index)
    loaded = {k: load_view(models[k], num_classes) for k in ("S1", "S2", "T", "T(T)")}
    if loaded["T(T)"][1] is None:
        raise KcdError("figure 1 needs the transformed teacher: models['T(T)'] has no transform")
    t_arch, s_arch = models["T"]["arch"], models["S1"]["arch"]
    # only the chosen class's images enter the maps: keep just those, once, in memory
    batches = [(x[y == index], y[y == index]) for x, y in eval_batches(spec, batch_size, split=split)
               if bool((y == index).any())]
    return activation_figure(
        (loaded["S1"][0], loaded["S2"][0]), loaded["T"][0], loaded["T(T)"][1],
        (default_layer(t_arch), default_layer(s_arch)), batches, index, num_classes, out,
        title=f"class '{label}': {s_arch} students S1, S2; {t_arch} teacher T",
    )
