from fp8lab.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
