"""Analyses of trained models that the paper reports besides accuracy (Section 5, Figure 1).

- :mod:`kcd.analysis.overlap`: Table 10, the overlap of the most activated channels per class
  between two models (and the shared rule for comparing a wider raw teacher with a student).
- :mod:`kcd.analysis.activation_maps`: Figure 1, class-averaged activation maps and their
  differences, drawn with matplotlib.

- :mod:`kcd.analysis.feature_consistency`: Table 11, KL of outputs and feature L2 distance
  between a teacher and students.

The submodules are imported explicitly and this package imports nothing at load time, so
loading the overlap analysis does not load matplotlib. Each module ends with the job the
``kcd`` command runs: it loads the models a spec names (:func:`load_view`) and writes its
result atomically.
"""
from __future__ import annotations

from typing import Any


def load_view(ref: dict[str, Any], num_classes: int):
    """A model of an analysis job, ``{"arch", "weights", "transform"?}``: the model in eval
    mode and its transform (None without one), with the one-line errors of the engines."""
    from kcd.checkpoint import load_model
    from kcd.transforms import load_transform

    model = load_model(ref["arch"], ref["weights"], num_classes, f"{ref['arch']} weights").eval()
    transform = load_transform(ref["transform"]).eval() if ref.get("transform") else None
    return model, transform


def default_layer(arch: str) -> str:
    from kcd.models import model_spec

    return model_spec(arch).default_layer
