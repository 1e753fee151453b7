"""Strategy factories the configs under ``conf/strategy/`` point at."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


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
