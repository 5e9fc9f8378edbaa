"""The local LoRA trainer shared by every algorithm, SHED's value function and Prada's proxy."""
from mira.train.trainer import LocalTrainer, TrainResult, TrainSettings

__all__ = ["LocalTrainer", "TrainResult", "TrainSettings"]
