"""Inference: diffusers' ControlNet pipeline from local parts, one or many ControlNets, any base
model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli_error
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image, ImageDraw

from cn_lightning.conditions import get_extractor
from cn_lightning.generate import main
from cn_lightning.inference import (
    Control,
    GenerationSettings,
    build_pipeline,
    default_size,
    generate,
    load_controlnet,
    prepare_condition,
)
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.checkpoints import save_controlnet_folder


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _photo(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """A small picture with shapes and a gradient: real edges for Canny."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)
    image = Image.fromarray(grad)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, w - 12), rng.integers(0, h - 12)
        draw.ellipse([x, y, x + 12, y + 12], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def assets(tiny_sd_path, tmp_path_factory) -> dict:
    from cn_lightning.models.tiny import write_tiny_backbone

    root = tmp_path_factory.mktemp("generate")
    unet = load_backbone(tiny_sd_path).unet
    controlnets = []
    for seed in (1, 2):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        _perturb(controlnet, seed)
        controlnets.append(str(save_controlnet_folder(controlnet, root / f"cn{seed}")))
    return {
        "base": tiny_sd_path,
        # A second SD1.x-architecture model with other weights: a "community fine-tune".
        "other_base": str(write_tiny_backbone(root / "other_sd", preset="test", seed=1)),
        "controlnets": controlnets,
        "photo": str(_photo(root / "photo.png")),
        "condition": str(_photo(root / "cond.png", size=(32, 32), seed=3)),
    }


def _settings(assets: dict, controls: list[Control], **kwargs) -> GenerationSettings:
    defaults = {
        "base": assets["base"],
        "prompt": "red circle",
        "steps": 2,
        "guidance_scale": 3.0,
        "seed": 5,
    }
    return GenerationSettings(controls=controls, **{**defaults, **kwargs})


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_cli_with_canny_on_another_base_model_writes_pngs_with_settings(assets, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--base",
        assets["other_base"],
        "--controlnet",
        assets["controlnets"][0],
        "--image",
        assets["photo"],
        "--extractor",
        "canny",
        "--prompt",
        "red circle",
        "--negative-prompt",
        "blurry",
        "--steps",
        "2",
        "--guidance",
        "3",
        "--seed",
        "5",
        "--batch",
        "2",
        "--width",
        "40",
        "--height",
        "32",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000005.png", "000006.png", "condition_0.png"]
    first, second = Image.open(out / "000005.png"), Image.open(out / "000006.png")
    assert first.size == second.size == (40, 32)
    meta = json.loads(first.text["cn_lightning"])
    assert meta["base"] == assets["other_base"] and meta["prompt"] == "red circle"
    assert meta["negative_prompt"] == "blurry" and meta["seed"] == 5 and meta["steps"] == 2
    assert meta["controls"] == [
        {
            "controlnet": assets["controlnets"][0],
            "image": assets["photo"],
            "scale": 1.0,
            "extractor": "canny",
            "extractor_weights": None,
        }
    ]
    assert json.loads(second.text["cn_lightning"])["seed"] == 6
    assert "Seed: 5, Size: 40x32" in first.text["parameters"]
    assert np.abs(_pixels(first) - _pixels(second)).max() > 0  # other seed, other image

    # The condition is Canny of the photo at the output size.
    photo = np.asarray(Image.open(assets["photo"]).convert("RGB").resize((40, 32), Image.LANCZOS))
    expected = get_extractor("canny")(photo)
    condition = np.asarray(Image.open(out / "condition_0.png"))
    assert np.array_equal(condition[..., 0], expected) and expected.any()

    # Same settings again give the same pixels; the original base model gives other pixels.
    control = Control(assets["controlnets"][0], assets["photo"], 1.0, "canny")
    common = {"negative_prompt": "blurry", "width": 40, "height": 32, "batch_size": 2}
    again, _ = generate(_settings(assets, [control], base=assets["other_base"], **common))
    assert np.array_equal(np.asarray(again[1]), np.asarray(second))
    on_base, _ = generate(_settings(assets, [control], **common))
    assert np.abs(_pixels(on_base[1]) - _pixels(second)).max() > 0


def test_multi_controlnet_is_the_sum_of_single_residuals(assets):
    backbone = load_backbone(assets["base"])
    nets = [load_controlnet(p, backbone, torch.float32) for p in assets["controlnets"]]
    pipe = build_pipeline(backbone, nets)
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    g = torch.Generator().manual_seed(0)
    sample, conds = (
        torch.randn(2, 4, 16, 16, generator=g),
        [torch.rand(2, 3, 32, 32, generator=g) for _ in nets],
    )
    emb, t, scales = torch.randn(2, 16, 32, generator=g), torch.tensor([20, 800]), [0.7, 1.3]
    with torch.no_grad():
        down, mid = pipe.controlnet(sample, t, emb, conds, scales, return_dict=False)
        singles = [
            net(sample, t, emb, c, conditioning_scale=s, return_dict=False)
            for net, c, s in zip(nets, conds, scales, strict=True)
        ]
    assert len(down) == len(singles[0][0]) == 6
    for i, residual in enumerate(down):
        torch.testing.assert_close(residual, singles[0][0][i] + singles[1][0][i], rtol=0, atol=0)
    torch.testing.assert_close(mid, singles[0][1] + singles[1][1], rtol=0, atol=0)
    assert all(torch.count_nonzero(s[1]) > 0 for s in singles)


def test_composition_through_the_pipeline(assets):
    a, b = assets["controlnets"]
    size = {"steps": 1, "width": 32, "height": 32}
    single, _ = generate(_settings(assets, [Control(a, assets["condition"], 0.8)], **size))
    pair = [Control(a, assets["condition"], 0.8), Control(b, assets["photo"], 0.0)]
    muted, _ = generate(_settings(assets, pair, **size))
    pair[1].scale = 1.0
    both, _ = generate(_settings(assets, pair, **size))
    assert single[0].size == (32, 32)
    assert np.array_equal(
        np.asarray(single[0]), np.asarray(muted[0])
    )  # a second ControlNet at scale 0 adds nothing
    assert np.abs(_pixels(both[0]) - _pixels(single[0])).max() > 0


def test_guess_mode_and_size_options(assets):
    control = Control(assets["controlnets"][0], assets["condition"])
    normal, _ = generate(_settings(assets, [control], prompt="", width=24, height=32, steps=1))
    guessed, _ = generate(
        _settings(assets, [control], prompt="", width=24, height=32, steps=1, guess_mode=True)
    )
    assert normal[0].size == guessed[0].size == (24, 32)
    assert np.abs(_pixels(normal[0]) - _pixels(guessed[0])).max() > 0


def test_default_size_is_the_backbones_own_and_none_means_no_extractor(assets):
    # The tiny models and the toy backbone train at 32 px, and their configs say so:
    # UNet sample_size (latent cells) x the VAE factor.
    from cn_lightning.config import asset

    for path in (assets["base"], asset("toy_sd")):
        backbone = load_backbone(path)
        assert backbone.unet.config.sample_size * backbone.vae_scale_factor == 32, path
    # The Python API takes "none" as the command line does: the image is the condition.
    control = Control(assets["controlnets"][0], assets["condition"], 1.0, "none")
    images, conditions = generate(_settings(assets, [control], steps=1))
    assert images[0].size == conditions[0].size == (32, 32)
    expected = np.asarray(Image.open(assets["condition"]).convert("RGB"))
    assert np.array_equal(np.asarray(conditions[0]), expected)


def test_default_size_keeps_the_aspect_at_the_native_resolution():
    # 48x40 photo: the shorter side goes to the model's native 64 px, rounded to multiples of 8.
    assert default_size(np.zeros((40, 48, 3), np.uint8), 64) == (80, 64)
    assert default_size(np.zeros((1000, 600, 3), np.uint8), 512) == (512, 856)


def test_condition_maps_keep_their_values_when_resized():
    labels = np.zeros((10, 10, 3), np.uint8)
    labels[:5] = (120, 120, 80)
    labels[5:] = (4, 200, 3)
    resized = np.asarray(prepare_condition(labels, 17, 23))
    assert resized.shape == (23, 17, 3)
    assert {tuple(c) for c in resized.reshape(-1, 3)} == {(120, 120, 80), (4, 200, 3)}


def test_bad_input_gives_one_clear_line(assets, tmp_path, capsys):
    cn, photo, out = assets["controlnets"][0], assets["photo"], str(tmp_path / "o")
    base = ["--base", assets["base"], "--out", out, "--steps", "1"]
    line = cli_error(
        capsys, main, [*base, "--controlnet", cn, "--image", photo, "--extractor", "sketchify"]
    )
    assert "unknown condition extractor 'sketchify'" in line and "canny" in line
    line = cli_error(
        capsys, main, [*base, "--controlnet", cn, "--image", str(tmp_path / "missing.png")]
    )
    assert "missing.png" in line and "does not exist" in line
    line = cli_error(capsys, main, [*base, "--controlnet", cn, cn, "--image", photo])
    assert "one --image per --controlnet" in line
    line = cli_error(
        capsys, main, [*base, "--controlnet", cn, "--image", photo, "--scale", "1", "1", "1"]
    )
    assert "--scale takes one value or one per ControlNet" in line
    line = cli_error(
        capsys,
        main,
        ["--base", str(tmp_path / "nobase"), "--out", out, "--controlnet", cn, "--image", photo],
    )
    assert "nobase" in line and "does not exist" in line
    line = cli_error(
        capsys, main, [*base, "--controlnet", cn, "--image", photo, "--sampler", "euler"]
    )
    assert "invalid choice: 'euler'" in line

    from cn_lightning.models.tiny import build_tiny_components

    wide = ControlNetModel.from_unet(
        build_tiny_components("small")[0], conditioning_embedding_out_channels=(16, 32)
    )
    save_controlnet_folder(wide, tmp_path / "wide")
    line = cli_error(
        capsys, main, [*base, "--controlnet", str(tmp_path / "wide"), "--image", photo]
    )
    assert "does not fit the base model" in line and "block_out_channels" in line
    sd_hint = ControlNetModel.from_unet(
        load_backbone(assets["base"]).unet
    )  # SD's 8x condition encoder
    save_controlnet_folder(sd_hint, tmp_path / "sd_hint")
    line = cli_error(
        capsys, main, [*base, "--controlnet", str(tmp_path / "sd_hint"), "--image", photo]
    )
    assert "downsamples its condition 8x but the base model's VAE downsamples 2x" in line
    assert not (tmp_path / "o").exists()


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--base",
        "--controlnet",
        "--image",
        "--scale",
        "--extractor",
        "--guess-mode",
        "--negative-prompt",
        "--steps",
        "--guidance",
        "--seed",
        "--width",
        "--height",
        "--batch",
        "--sampler",
        "--out",
    ):
        assert option in text
