"""kcd: Knowledge Consistent Distillation, reproduced as a pipeline."""

__version__ = "0.1.0"
