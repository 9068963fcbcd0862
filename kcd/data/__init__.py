"""Data: the paper's datasets from local folders, synthetic demo data, and a fast tensor loader.

:data:`DATASETS` is the one list of dataset names, each with its task and where its builder
lives. It imports no torch, so the workflow validates a config and chooses rules by task
without it; the readers in :mod:`kcd.data.datasets` are loaded when a dataset is built. The
other names below are importable from ``kcd.data`` and loaded on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from kcd.registry import Registry

TASKS = ("classification", "detection")
TRAIN_SPLIT, EVAL_SPLIT = "train", "val"  # the splits every dataset has, by these names


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its name, its task and its builder (``"module:function"``
    taking ``(root, split, train_transform, image_size, download)``). ``image_files``: its
    classification images are files decoded per read (an image folder), so the fast loader
    decodes each split once (:mod:`kcd.data.decoded`). ``demo_folder``: the folder of its
    generated demo data under ``demo_data.root`` (:mod:`kcd.data.demo` writes it); None: the
    demo has none."""

    name: str
    builder: str
    task: Literal["classification", "detection"]
    image_files: bool = False
    demo_folder: str | None = None

    def build(self, *args: Any) -> Any:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(*args)


DATASETS: Registry[DatasetSpec] = Registry("dataset")
for _name, _task, _folder in (("cifar10", "classification", "cifar-10-batches-py"),
                              ("cifar100", "classification", "cifar-100-python"),
                              ("imagenet", "classification", "imagenet"),
                              ("coco", "detection", "coco")):
    DATASETS.register(_name, DatasetSpec(_name, f"kcd.data.datasets:{_name}_dataset", _task,
                                         image_files=_name == "imagenet", demo_folder=_folder))


def demo_folders() -> dict[str, str]:
    """Each dataset with demo data, and its folder under the demo root."""
    return {name: spec.demo_folder for name, spec in DATASETS.items() if spec.demo_folder}


def datasets_of_task(task: str) -> list[str]:
    """The registered datasets of ``task`` (``"classification"`` or ``"detection"``)."""
    return [name for name, spec in DATASETS.items() if spec.task == task]


_EXPORTS = {
    **dict.fromkeys((
        "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR_READERS",
        "IMAGENET_MEAN", "IMAGENET_STD", "CheckedCocoDetection", "CIFARUnpickler",
        "LocalCIFAR10", "LocalCIFAR100", "build_dataset", "check_num_classes",
        "coco_target_to_tensors", "load_cifar_pickle", "num_classes"), "datasets"),
    "DemoSizes": "demo", "write_demo_data": "demo", "TensorDataLoader": "loader",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kcd.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kcd.data' has no attribute '{name}'")


__all__ = ["DATASETS", "DatasetSpec", "TASKS", "datasets_of_task", "demo_folders", *_EXPORTS]
