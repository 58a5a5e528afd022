"""`train(cfg)`, the entry point the CLI calls; the stage run itself is `mmalign.train.stage`."""

from mmalign.train.stage import StageRun, train

__all__ = ["StageRun", "train"]
