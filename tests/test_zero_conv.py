"""The zero-convolution ablation (``model.zero_conv_init``): what each variant is at step 0.

``zero`` (the paper) equals the locked backbone exactly; ``gaussian`` does not; ``none`` adds the
branch's own features to the skip connections (identity junctions, frozen), and keeps the
diffusers and original layouts, so its exports load anywhere.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

from cn_lightning.config import asset
from cn_lightning.errors import ConfigError
from cn_lightning.models.controlnet import (
    ZERO_CONV_INITS,
    has_identity_junctions,
    init_junctions,
    input_junction,
    output_junctions,
)
from cn_lightning.models.module import ControlNetModule


@pytest.fixture(scope="module")
def modules() -> dict[str, ControlNetModule]:
    return {
        mode: ControlNetModule(asset("toy_sd"), zero_conv_init=mode, seed=0).eval()
        for mode in ZERO_CONV_INITS
    }


def _inputs(module: ControlNetModule, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    timesteps = torch.tensor([999, 700, 300, 10])[:n]
    condition = (torch.rand(n, 3, 32, 32, generator=g) > 0.9).float()
    text = module.encode_prompt(["red circle with blue background"] * n)
    return latents, timesteps, text, condition


@torch.no_grad()
def _locked(module: ControlNetModule, latents, timesteps, text) -> torch.Tensor:
    return module.unet(latents, timesteps, encoder_hidden_states=text).sample.float()


def test_zero_init_equals_the_locked_backbone_exactly(modules):
    module = modules["zero"]
    latents, timesteps, text, condition = _inputs(module)
    with torch.no_grad():
        controlled = module(latents, timesteps, text, condition)
    assert torch.equal(controlled, _locked(module, latents, timesteps, text))
    for conv in [input_junction(module.controlnet), *output_junctions(module.controlnet)]:
        assert not conv.weight.any() and not conv.bias.any() and conv.weight.requires_grad


def test_gaussian_init_differs_and_has_the_documented_scale(modules):
    module = modules["gaussian"]
    latents, timesteps, text, condition = _inputs(module)
    with torch.no_grad():
        controlled = module(latents, timesteps, text, condition)
    locked = _locked(module, latents, timesteps, text)
    assert (controlled - locked).abs().mean() > 1e-2
    for conv in [input_junction(module.controlnet), *output_junctions(module.controlnet)]:
        fan_in = conv.weight[0].numel()
        std = float(conv.weight.std())
        assert abs(std * math.sqrt(fan_in) - 1) < 0.25, (conv, std)
        assert not conv.bias.any() and conv.weight.requires_grad
    again = ControlNetModule(asset("toy_sd"), zero_conv_init="gaussian", seed=0)
    other = ControlNetModule(asset("toy_sd"), zero_conv_init="gaussian", seed=1, zero_conv_std=0.5)
    first = output_junctions(module.controlnet)[0].weight
    assert torch.equal(output_junctions(again.controlnet)[0].weight, first)
    assert not torch.equal(output_junctions(other.controlnet)[0].weight, first)
    assert abs(float(output_junctions(other.controlnet)[-1].weight.std()) - 0.5) < 0.1


def test_none_variant_adds_the_branch_features_directly(modules):
    module = modules["none"]
    controlnet = module.controlnet
    latents, timesteps, text, condition = _inputs(module)
    seen: dict[str, object] = {}
    hooks = [
        controlnet.conv_in.register_forward_hook(lambda m, i, o: seen.__setitem__("conv_in", o)),
        controlnet.controlnet_cond_embedding.register_forward_hook(
            lambda m, i, o: seen.__setitem__("cond", o)
        ),
        controlnet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o)),
    ]
    blocks: list[tuple[torch.Tensor, ...]] = []
    hooks += [
        b.register_forward_hook(lambda m, i, o: blocks.append(o[1])) for b in controlnet.down_blocks
    ]
    with torch.no_grad():
        down, mid = controlnet(
            latents,
            timesteps,
            encoder_hidden_states=text,
            controlnet_cond=condition,
            return_dict=False,
        )
    for h in hooks:
        h.remove()
    features = [seen["conv_in"] + seen["cond"], *[r for res in blocks for r in res]]
    assert len(features) == len(down)
    for residual, feature in zip(down, features, strict=True):
        assert torch.equal(residual, feature)
    assert torch.equal(mid, seen["mid"])
    # The condition enters through an ordinary (non-zero) convolution.
    assert input_junction(controlnet).weight.abs().mean() > 0
    assert has_identity_junctions(controlnet)


def test_none_variant_junctions_stay_identities_through_training(modules):
    module = ControlNetModule(asset("toy_sd"), zero_conv_init="none", seed=0)
    junction_params = {id(p) for c in output_junctions(module.controlnet) for p in c.parameters()}
    optimizer = module.configure_optimizers()
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not junction_params & optimised
    assert all(
        not p.requires_grad for c in output_junctions(module.controlnet) for p in c.parameters()
    )
    before = input_junction(module.controlnet).weight.detach().clone()
    latents, timesteps, text, condition = _inputs(module, n=2)
    loss = module(latents, timesteps, text, condition).square().mean()
    loss.backward()
    optimizer.step()
    assert has_identity_junctions(module.controlnet)
    assert not torch.equal(input_junction(module.controlnet).weight, before)


def test_none_variant_exports_and_loads_in_both_formats(modules, tmp_path):
    from cn_lightning.models.checkpoints import load_any_controlnet, save_controlnet_folder
    from cn_lightning.models.convert_original import controlnet_to_original, original_to_controlnet

    module = modules["none"]
    folder = save_controlnet_folder(module.controlnet, tmp_path / "controlnet")
    loaded, _ = load_any_controlnet(str(folder))
    assert has_identity_junctions(loaded)
    latents, timesteps, text, condition = _inputs(module)
    with torch.no_grad():
        a = module.controlnet(latents, timesteps, text, condition, return_dict=False)
        b = loaded(latents, timesteps, text, condition, return_dict=False)
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]], strict=True):
        assert torch.equal(x, y)
    # The original layout (an SD-shaped tiny ControlNet: its hint encoder has 4 stages) keeps
    # the identity junctions bit for bit: there is nothing to refuse.
    sd_shaped = ControlNetModel(
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8, 8, 16),
    )
    init_junctions(sd_shaped, "none", seed=3)
    original = controlnet_to_original(sd_shaped.state_dict(), sd_shaped.config)
    back = ControlNetModel.from_config(sd_shaped.config)
    back.load_state_dict(original_to_controlnet(original, sd_shaped.config), strict=True)
    assert has_identity_junctions(back)


def test_options_are_checked_in_one_line(tmp_path):
    from cn_lightning.models.checkpoints import save_controlnet_folder

    with pytest.raises(ConfigError, match="zero_conv_init must be one of zero, gaussian, none"):
        ControlNetModule(asset("toy_sd"), zero_conv_init="xavier")
    zero = ControlNetModule(asset("toy_sd"))
    path = str(save_controlnet_folder(zero.controlnet, tmp_path / "zero"))
    with pytest.raises(ConfigError, match="gaussian initialises a new branch"):
        ControlNetModule(asset("toy_sd"), controlnet_path=path, zero_conv_init="gaussian")
    with pytest.raises(ConfigError, match="not identities"):
        ControlNetModule(asset("toy_sd"), controlnet_path=path, zero_conv_init="none")


def test_model_configs_default_to_the_paper():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / "sd15.yaml"
    cfg = OmegaConf.load(conf)
    assert cfg.zero_conv_init == "zero" and cfg.zero_conv_std is None


@torch.no_grad()
def test_step_zero_samples_against_the_locked_backbone(modules):
    """The claim-1 measurement at step 0 (no training), on 8 held-out prompts with the same
    noise: zero init draws exactly the locked backbone's samples; gaussian and none do not."""
    from cn_lightning.data.synthetic import COLOURS, circle_sample
    from cn_lightning.models.toy import colour_statistics, nearest_colour_names

    samples = [circle_sample(i, 32, seed=1) for i in range(8)]
    condition = (
        torch.stack(
            [
                torch.from_numpy(np.repeat(o[:, :, None], 3, 2)).permute(2, 0, 1)
                for o, _, _ in samples
            ]
        ).float()
        / 255
    )
    prompts = [p for _, _, p in samples]
    images = {}
    for mode, module in modules.items():
        images[mode] = module.sample(condition, prompts, num_inference_steps=10, guidance_scale=3.0)
    module = modules["zero"]
    module.control_scales = [0.0] * (len(module.controlnet.controlnet_down_blocks) + 1)
    try:
        locked = module.sample(condition, prompts, num_inference_steps=10, guidance_scale=3.0)
    finally:
        module.control_scales = None
    assert torch.equal(images["zero"], locked)
    for mode in ("gaussian", "none"):
        assert (images[mode] - locked).abs().mean() > 0.01, mode
    _, fg = colour_statistics(locked)
    names = nearest_colour_names(fg, COLOURS)
    assert len(names) == 8
