"""Evaluation: confusion-matrix metrics (`metrics`) and prediction (`inference`)."""

from plca.evaluation.metrics import ConfusionMatrix, iou, miou, summarize

__all__ = ["ConfusionMatrix", "iou", "miou", "summarize"]
