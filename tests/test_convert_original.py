"""diffusers ControlNet <-> original ``control_model.*`` layout, checked bit for bit.

The expected original layout is written out independently below from the ControlNet authors'
``cldm.py`` (``ControlNet.__init__``), so the converter is compared with the architecture itself,
not with its own inverse.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import ControlNetModel, UNet2DConditionModel  # noqa: E402

from cn_lightning.errors import CheckpointFormatError, CnLightningError  # noqa: E402
from cn_lightning.models.checkpoints import save_original  # noqa: E402
from cn_lightning.models.convert_original import (  # noqa: E402
    controlnet_to_original,
    original_to_controlnet,
)
from cn_lightning.models.single_file import config_dir  # noqa: E402

SD15_CONTROLNET_PARAMS = 361_279_120


def cldm_controlnet_shapes(
    model_channels: int = 320,
    channel_mult: tuple[int, ...] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    attention_levels: tuple[int, ...] = (0, 1, 2),
    context_dim: int = 768,
    linear_projection: bool = False,
    hint: tuple[int, ...] = (16, 32, 96, 256),
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``cldm.ControlNet`` (in_channels 4, hint_channels 3, transformer_depth 1)."""
    shapes: dict[str, tuple[int, ...]] = {}
    emb = 4 * model_channels

    def linear(name: str, i: int, o: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i), (o,)

    def conv(name: str, i: int, o: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resblock(p: str, i: int, o: int) -> None:
        norm(f"{p}.in_layers.0", i)
        conv(f"{p}.in_layers.2", i, o, 3)
        linear(f"{p}.emb_layers.1", emb, o)
        norm(f"{p}.out_layers.0", o)
        conv(f"{p}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{p}.skip_connection", i, o, 1)

    def spatial_transformer(p: str, c: int) -> None:
        proj = (lambda n: linear(n, c, c)) if linear_projection else (lambda n: conv(n, c, c, 1))
        norm(f"{p}.norm", c)
        proj(f"{p}.proj_in")
        tb = f"{p}.transformer_blocks.0"
        for attn, kv_dim in (("attn1", c), ("attn2", context_dim)):
            shapes[f"{tb}.{attn}.to_q.weight"] = (c, c)
            shapes[f"{tb}.{attn}.to_k.weight"] = (c, kv_dim)
            shapes[f"{tb}.{attn}.to_v.weight"] = (c, kv_dim)
            linear(f"{tb}.{attn}.to_out.0", c, c)
        linear(f"{tb}.ff.net.0.proj", c, 8 * c)  # GEGLU: 2 x (4 c)
        linear(f"{tb}.ff.net.2", 4 * c, c)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{tb}.{n}", c)
        proj(f"{p}.proj_out")

    linear("time_embed.0", model_channels, emb)
    linear("time_embed.2", emb, emb)
    # input_hint_block: conv, SiLU, (conv, SiLU, conv stride 2, SiLU) x 3, zero conv
    conv("input_hint_block.0", 3, hint[0], 3)
    idx = 2
    for a, b in zip(hint[:-1], hint[1:], strict=True):
        conv(f"input_hint_block.{idx}", a, a, 3)
        conv(f"input_hint_block.{idx + 2}", a, b, 3)
        idx += 4
    conv(f"input_hint_block.{idx}", hint[-1], model_channels, 3)

    conv("input_blocks.0.0", 4, model_channels, 3)
    conv("zero_convs.0.0", model_channels, model_channels, 1)
    ch, n = model_channels, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{n}.0", ch, mult * model_channels)
            ch = mult * model_channels
            if level in attention_levels:
                spatial_transformer(f"input_blocks.{n}.1", ch)
            conv(f"zero_convs.{n}.0", ch, ch, 1)
            n += 1
        if level != len(channel_mult) - 1:
            conv(f"input_blocks.{n}.0.op", ch, ch, 3)
            conv(f"zero_convs.{n}.0", ch, ch, 1)
            n += 1
    resblock("middle_block.0", ch, ch)
    spatial_transformer("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    conv("middle_block_out.0", ch, ch, 1)
    return {f"control_model.{k}": v for k, v in shapes.items()}


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        total += int(torch.Size(shape).numel())
    return total


def _shipped(variant: str, name: str) -> dict:
    return json.loads((config_dir(variant) / name / "config.json").read_text())


@pytest.mark.parametrize("variant", ["sd15", "sd21"])
def test_full_size_keys_and_shapes_match_cldm(variant: str) -> None:
    sd2 = variant == "sd21"
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(
            UNet2DConditionModel.from_config(_shipped(variant, "unet"))
        )
    original = controlnet_to_original(controlnet.state_dict(), controlnet.config)
    expected = cldm_controlnet_shapes(context_dim=1024 if sd2 else 768, linear_projection=sd2)
    assert {k: tuple(v.shape) for k, v in original.items()} == expected
    assert len(original) == 340
    if not sd2:
        assert _numel(expected) == SD15_CONTROLNET_PARAMS
    assert original["control_model.input_hint_block.0.weight"].shape == (16, 3, 3, 3)
    assert original["control_model.input_hint_block.14.weight"].shape == (320, 256, 3, 3)
    assert original["control_model.zero_convs.0.0.weight"].shape == (320, 320, 1, 1)
    assert original["control_model.zero_convs.11.0.weight"].shape == (1280, 1280, 1, 1)
    assert original["control_model.middle_block_out.0.weight"].shape == (1280, 1280, 1, 1)
    assert original["control_model.time_embed.2.weight"].shape == (1280, 1280)
    assert original["control_model.input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    proj_in = original["control_model.input_blocks.1.1.proj_in.weight"].shape
    assert proj_in == ((320, 320) if sd2 else (320, 320, 1, 1))


TINY = {
    "block_out_channels": (8, 16),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "cross_attention_dim": 12,
    "norm_num_groups": 4,
    "conditioning_embedding_out_channels": (4, 8, 8, 16),
}
TINY_SD1 = {**TINY, "attention_head_dim": 2, "use_linear_projection": False}
TINY_SD2 = {**TINY, "attention_head_dim": (2, 4), "use_linear_projection": True}


def _random_controlnet(config: dict, seed: int = 0) -> ControlNetModel:
    """A tiny ControlNet with random values everywhere (its zero convs would hide swapped keys)."""
    model = ControlNetModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _assert_bit_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1-conv-proj", "sd2-linear-proj"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_diffusers_to_original_loads_back_with_diffusers(
    tmp_path: Path, config: dict, suffix: str
) -> None:
    model = _random_controlnet(config)
    original = controlnet_to_original(model.state_dict(), model.config)
    expected = cldm_controlnet_shapes(
        model_channels=8,
        channel_mult=(1, 2),
        attention_levels=(0,),
        context_dim=12,
        linear_projection=config["use_linear_projection"],
        hint=(4, 8, 8, 16),
    )
    assert {k: tuple(v.shape) for k, v in original.items()} == expected
    model.save_config(tmp_path)
    path = save_original(original, tmp_path / f"control_tiny{suffix}")
    loaded = ControlNetModel.from_single_file(
        str(path), config=str(tmp_path), local_files_only=True
    )
    _assert_bit_identical(model.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1-conv-proj", "sd2-linear-proj"])
@pytest.mark.parametrize("prefixed", [True, False], ids=["control_model.", "no-prefix"])
def test_original_to_diffusers_to_original(config: dict, prefixed: bool) -> None:
    """Start from random tensors in the cldm layout; diffusers' converter then ours gives them
    back."""
    shapes = cldm_controlnet_shapes(
        model_channels=8,
        channel_mult=(1, 2),
        attention_levels=(0,),
        context_dim=12,
        linear_projection=config["use_linear_projection"],
        hint=(4, 8, 8, 16),
    )
    g = torch.Generator().manual_seed(1)
    original = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    # Some distributed files (e.g. thibaud/controlnet-sd21) have no "control_model." prefix.
    given = (
        original if prefixed else {k.removeprefix("control_model."): v for k, v in original.items()}
    )
    model = ControlNetModel(**config)
    converted = original_to_controlnet(given, model.config)
    model.load_state_dict(converted, strict=True)  # every parameter provided, nothing left over
    _assert_bit_identical(controlnet_to_original(model.state_dict(), model.config), original)


def test_class_embedding_round_trip() -> None:
    model = _random_controlnet({**TINY_SD1, "num_class_embeds": 3})
    original = controlnet_to_original(model.state_dict(), model.config)
    assert original["control_model.label_emb.weight"].shape == (3, 32)
    _assert_bit_identical(original_to_controlnet(original, model.config), model.state_dict())


def test_non_original_hint_encoder_is_refused() -> None:
    model = ControlNetModel(**{**TINY_SD1, "conditioning_embedding_out_channels": (16, 32)})
    with pytest.raises(CheckpointFormatError, match=r"exactly 6") as info:
        controlnet_to_original(model.state_dict(), model.config)
    assert isinstance(info.value, CnLightningError) and "\n" not in str(info.value)


def test_unknown_and_inconsistent_keys_are_refused() -> None:
    model = ControlNetModel(**TINY_SD1)
    state = model.state_dict()
    with pytest.raises(
        CheckpointFormatError, match="no original-format equivalent: 'lora_A.weight'"
    ):
        controlnet_to_original({**state, "lora_A.weight": torch.zeros(1)}, model.config)
    with pytest.raises(CheckpointFormatError, match="layers_per_block=1"):
        controlnet_to_original(state, {**model.config, "layers_per_block": 1})
    original = controlnet_to_original(state, model.config)
    del original["control_model.zero_convs.3.0.weight"]
    with pytest.raises(CheckpointFormatError, match="controlnet_down_blocks.3.weight"):
        original_to_controlnet(original, model.config)


def test_save_original_is_atomic_and_casts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _random_controlnet(TINY_SD1)
    original = controlnet_to_original(model.state_dict(), model.config)
    path = save_original(original, tmp_path / "out" / "cn.safetensors", dtype=torch.float16)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cn.safetensors"]  # no temp file left
    loaded = load_file(str(path))
    assert set(loaded) == set(original)
    assert all(v.dtype == torch.float16 for v in loaded.values())
    key = "control_model.middle_block_out.0.weight"
    assert torch.equal(loaded[key], original[key].half())

    pth = save_original(original, tmp_path / "cn.pth")
    _assert_bit_identical(torch.load(pth, weights_only=True), original)

    with pytest.raises(CheckpointFormatError, match=r"cn\.bin: expected a \.safetensors"):
        save_original(original, tmp_path / "cn.bin")

    # A failure while writing (safetensors refuses tensors sharing memory) leaves the old file and
    # no temp file behind.
    before = path.read_bytes()
    shared = torch.ones(2)
    with pytest.raises(RuntimeError, match="share memory"):
        save_original({"a": shared, "b": shared}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["cn.safetensors"]
