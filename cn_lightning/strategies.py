"""Strategy factories the configs under ``conf/strategy/`` point at."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from cn_lightning.atomic import replace_directory


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint directories appear whole or not at all.

    DeepSpeed writes a checkpoint as a directory of per-rank shards; a job killed mid-write
    (a preemption's SIGKILL) would leave ``last.ckpt/`` half-written and unloadable. Every rank
    writes into ``<name>.tmp/`` first; once all have finished, rank 0 swaps it into place
    (the previous one is kept as ``<name>.old/`` for the instant between two renames, and
    resuming falls back to it). Checkpoints must be on a file system every rank shares.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        path = Path(filepath)
        tmp = path.with_name(path.name + ".tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("cn_checkpoint_start")
        super().save_checkpoint(checkpoint, str(tmp), storage_options)
        self.barrier("cn_checkpoint_written")
        if self.is_global_zero:
            replace_directory(tmp, path)
        self.barrier("cn_checkpoint_done")


def fsdp_wrap_classes() -> set[type]:
    """The blocks FSDP wraps one by one: diffusers' ResNet and transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return {ResnetBlock2D, BasicTransformerBlock}


def fsdp_strategy(**kwargs: Any) -> FSDPStrategy:
    """``FSDPStrategy`` with an auto-wrap policy over the UNet/ControlNet blocks.

    Any ``FSDPStrategy`` argument can be given; ``auto_wrap_policy`` defaults to
    :func:`fsdp_wrap_classes` (a set of module classes cannot be written in YAML).
    """
    kwargs.setdefault("auto_wrap_policy", fsdp_wrap_classes())
    return FSDPStrategy(**kwargs)
