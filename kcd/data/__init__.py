"""Data: the paper's datasets from local folders, synthetic demo data, and a fast tensor loader."""
from kcd.data.datasets import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckedCocoDetection,
    LocalCIFAR100,
    build_dataset,
    coco_target_to_tensors,
    num_classes,
)
from kcd.data.demo import DemoSizes, write_demo_data
from kcd.data.loader import TensorDataLoader

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckedCocoDetection",
    "DemoSizes",
    "LocalCIFAR100",
    "TensorDataLoader",
    "build_dataset",
    "coco_target_to_tensors",
    "num_classes",
    "write_demo_data",
]
