"""Parameter counts of the full-size architectures from the shipped configs (meta device, no
memory)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from cn_lightning.models.single_file import config_dir

SD15_CONTROLNET_PARAMS = 361_279_120  # the original cldm ControlNet and diffusers agree on this


def _config(variant: str, name: str) -> dict:
    return json.loads((config_dir(variant) / name / "config.json").read_text())


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sd15_controlnet_from_unet_has_paper_size() -> None:
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(
            UNet2DConditionModel.from_config(_config("sd15", "unet"))
        )
    assert _count(controlnet) == SD15_CONTROLNET_PARAMS


def test_sd15_controlnet_config_has_paper_size() -> None:
    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(_config("sd15", "controlnet"))
    assert _count(controlnet) == SD15_CONTROLNET_PARAMS


@pytest.mark.parametrize("variant", ["sd15", "sd21", "sd21-base"])
def test_shipped_controlnet_config_equals_from_unet(variant: str) -> None:
    """The shipped controlnet/config.json describes the same network as ``from_unet(unet)``."""
    with torch.device("meta"):
        from_unet = ControlNetModel.from_unet(
            UNet2DConditionModel.from_config(_config(variant, "unet"))
        )
        from_config = ControlNetModel.from_config(_config(variant, "controlnet"))
    shapes = {k: tuple(v.shape) for k, v in from_unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in from_config.state_dict().items()} == shapes
    for key in (
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "upcast_attention",
    ):
        assert from_config.config[key] == from_unet.config[key], key


def test_sd15_unet_size() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("sd15", "unet"))
    assert _count(unet) == 859_520_964  # the published SD1.5 UNet size
