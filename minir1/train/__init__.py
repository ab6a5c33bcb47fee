"""Training: one shared loop (`loop.py`) and one file per stage holding only its data and its loss."""

from minir1.train.loop import Stage, TrainConfig, TrainingError, train

__all__ = ["Stage", "TrainConfig", "TrainingError", "train"]
