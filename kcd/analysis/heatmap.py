"""The consistency matrix of a teacher/student pair as a picture, with the transform's matches.

For the KCD transform of a pair, :func:`consistency_heatmap` writes

- ``<prefix>.png``: the matrix ``M`` (teacher channels as rows, student channels as columns)
  of the transform's metric over the training images, each student channel's matched teacher
  channel marked, and Γ (the consistency of the student with the teacher's leading channels)
  before and after the transform in the title;
- ``<prefix>.csv``: the transform as a table to read: for each student channel, the teacher
  channel it receives and their consistency.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import torch

from kcd.checkpoint import atomic_write_text, atomic_write_with
from kcd.errors import KcdError
from kcd.statistics import pair_matrix
from kcd.transforms import load_transform


def channel_map(transform: torch.nn.Module) -> torch.Tensor | None:
    """The teacher channel of each student channel, for a channel-selection transform (None
    for learned transforms; the first group's for per-class ones)."""
    parts = getattr(transform, "transforms", None)
    if parts is not None and len(parts):
        transform = parts[0]
    index = getattr(transform, "index", None)
    return index.detach().cpu().long() if isinstance(index, torch.Tensor) else None


def consistency_heatmap(stats: str | os.PathLike, transform: str | os.PathLike, metric: str,
                        out_prefix: str | os.PathLike, title: str | None = None) -> dict:
    """Write ``<out_prefix>.png`` and ``.csv`` (see the module docstring); return their paths
    and Γ before and after."""
    from matplotlib.figure import Figure

    matrix, pair = pair_matrix(stats, metric)
    t = load_transform(transform)
    meta = dict(getattr(t, "meta", {}) or {})
    if meta.get("student") and meta["student"] != pair["student"] or (
            meta.get("teacher") and meta["teacher"] != pair["teacher"]):
        raise KcdError(f"transform {transform} was made for {meta.get('teacher')} -> "
                       f"{meta.get('student')}, but statistics {stats} are of "
                       f"{pair['teacher']} -> {pair['student']}")
    index = channel_map(t)
    m = matrix.detach().cpu().float()
    if index is not None and (index.numel() != m.shape[1] or int(index.max()) >= m.shape[0]):
        raise KcdError(f"transform {transform} maps {index.numel()} student channels to "
                       f"teacher channels up to {int(index.max())}, but statistics {stats} are "
                       f"{m.shape[0]} x {m.shape[1]}; rebuild the transform from them")

    c_t, c_s = m.shape
    fig = Figure(figsize=(9, 9 * min(2.0, max(0.4, c_t / c_s))), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(m.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    if index is not None:
        ax.scatter(torch.arange(c_s).numpy(), index.numpy(), s=max(1.0, 400.0 / c_s),
                   c="red", marker="s", linewidths=0, label="matched by the transform")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel(f"student {pair['student']} channel ({pair['layers'][1]})")
    ax.set_ylabel(f"teacher {pair['teacher']} channel ({pair['layers'][0]})")
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"consistency ({metric})")
    gamma = ""
    if meta.get("gamma_before") is not None and meta.get("gamma_after") is not None:
        gamma = f"; Γ {meta['gamma_before']:.3g} -> {meta['gamma_after']:.3g}"
    ax.set_title(f"{title or 'consistency matrix'}: {c_t} x {c_s}{gamma}", fontsize=10)

    png, table = Path(f"{out_prefix}.png"), Path(f"{out_prefix}.csv")  # a prefix may hold dots
    atomic_write_with(png, lambda f: fig.savefig(f, format="png", dpi=120))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["student_channel", "teacher_channel", f"consistency_{metric}"])
    if index is not None:
        for j, i in enumerate(index.tolist()):
            writer.writerow([j, i, f"{float(m[i, j]):.6g}"])
    atomic_write_text(text.getvalue(), table)
    return {"png": str(png), "csv": str(table), "gamma_before": meta.get("gamma_before"),
            "gamma_after": meta.get("gamma_after"), "teacher": pair["teacher"],
            "student": pair["student"]}
