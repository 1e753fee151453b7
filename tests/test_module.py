"""ControlNetModule: zero-conv identity, frozen backbone, loss targets, prompt dropping."""

from __future__ import annotations

import pytest
import torch
from core_helpers import random_batch

from cn_lightning.models.module import ControlNetModule


@pytest.fixture(scope="module")
def module(tiny_sd_path):
    torch.manual_seed(0)
    return ControlNetModule(tiny_sd_path, learning_rate=1e-3)


def _inputs(batch_size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch_size, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch_size,), generator=g)
    condition = torch.rand(batch_size, 3, 32, 32, generator=g)
    return noisy, t, condition


def test_initial_output_equals_locked_unet_exactly(module):
    noisy, t, condition = _inputs()
    emb = module.encode_prompt(["a red circle", "blue background"])
    with torch.no_grad():
        controlled = module(noisy, t, emb, condition)
        locked = module.unet(noisy, t, encoder_hidden_states=emb).sample
    assert torch.equal(controlled, locked)
    # The zero convs are exactly zero at initialisation, the hint encoder's last conv too.
    for conv in [*module.controlnet.controlnet_down_blocks, module.controlnet.controlnet_mid_block]:
        assert torch.count_nonzero(conv.weight) == 0


def test_training_changes_only_the_control_branch(tiny_sd_path):
    torch.manual_seed(0)
    m = ControlNetModule(tiny_sd_path, learning_rate=1e-3)
    frozen = {
        "unet": {k: v.clone() for k, v in m.unet.state_dict().items()},
        "vae": {k: v.clone() for k, v in m.vae.state_dict().items()},
        "text_encoder": {k: v.clone() for k, v in m.text_encoder.state_dict().items()},
    }
    control_before = {k: v.clone() for k, v in m.controlnet.state_dict().items()}
    optimizer = m.configure_optimizers()
    optimizer_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in m.controlnet.parameters()}
    for step in range(3):
        loss = m.compute_loss(random_batch(seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, before in frozen.items():
        after = getattr(m, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    changed = [
        k for k, v in m.controlnet.state_dict().items() if not torch.equal(v, control_before[k])
    ]
    assert len(changed) > len(control_before) // 2
    assert all(not p.requires_grad for p in m.unet.parameters())


def test_unlocked_decoder_trains_with_its_own_learning_rate(tiny_sd_path):
    m = ControlNetModule(
        tiny_sd_path, sd_locked=False, learning_rate=1e-3, decoder_learning_rate=1e-4
    )
    optimizer = m.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    decoder = {id(p) for p in optimizer.param_groups[1]["params"]}
    expected = {
        id(p)
        for n, p in m.unet.named_parameters()
        if n.startswith(("up_blocks.", "conv_norm_out.", "conv_out."))
    }
    assert decoder == expected
    encoder_before = m.unet.down_blocks[0].resnets[0].conv1.weight.clone()
    loss = m.compute_loss(random_batch())
    loss.backward()
    optimizer.step()
    assert torch.equal(m.unet.down_blocks[0].resnets[0].conv1.weight, encoder_before)
    assert any(k.startswith("unet.up_blocks.") for k in m.state_dict())


def test_ucg_rate_is_honoured(module):
    prompts = ["p"] * 4000
    g = torch.Generator().manual_seed(0)
    dropped = sum(p == "" for p in module.drop_prompts(prompts, generator=g)) / len(prompts)
    assert abs(dropped - 0.5) < 0.03
    module.hparams.ucg_rate = 0.0
    assert module.drop_prompts(prompts[:100]) == prompts[:100]
    module.hparams.ucg_rate = 1.0
    assert module.drop_prompts(prompts[:100]) == [""] * 100
    module.hparams.ucg_rate = 0.5


def test_targets_follow_the_scheduler(module, tiny_sd_v_path):
    latents = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 400, 999])
    assert torch.equal(module.diffusion_target(latents, noise, t), noise)
    v_module = ControlNetModule(tiny_sd_v_path)
    alphas = v_module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected_v = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(v_module.diffusion_target(latents, noise, t), expected_v)


def test_overfitting_one_batch_lowers_the_loss(tiny_sd_path):
    torch.manual_seed(0)
    m = ControlNetModule(tiny_sd_path, learning_rate=2e-2, ucg_rate=0.0, latent_sampling="mode")
    batch = random_batch(batch_size=2)
    optimizer = m.configure_optimizers()

    def fixed_loss() -> float:
        # Same noise and timesteps every time, so only the weights change the number.
        with torch.no_grad():
            return m.compute_loss(batch, generator=torch.Generator().manual_seed(123)).item()

    start = fixed_loss()
    for _ in range(50):
        loss = m.compute_loss(batch, generator=torch.Generator().manual_seed(123))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert fixed_loss() < 0.75 * start


def test_control_scales_and_only_mid_control(tiny_sd_path):
    torch.manual_seed(0)
    m = ControlNetModule(tiny_sd_path)
    # Give the zero convs weights so the residuals are not zero.
    with torch.no_grad():
        for conv in [*m.controlnet.controlnet_down_blocks, m.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
    noisy, t, condition = _inputs()
    emb = m.encode_prompt(["a", "b"])
    with torch.no_grad():
        full = m(noisy, t, emb, condition)
        m.control_scales = [0.0] * (len(m.controlnet.controlnet_down_blocks) + 1)
        zero = m(noisy, t, emb, condition)
        locked = m.unet(noisy, t, encoder_hidden_states=emb).sample
        m.control_scales = None
        m.hparams.only_mid_control = True
        mid_only = m(noisy, t, emb, condition)
        m.hparams.only_mid_control = False
    assert torch.equal(zero, locked)
    assert not torch.allclose(full, locked)
    assert not torch.allclose(mid_only, full) and not torch.allclose(mid_only, locked)


def test_sample_shapes_ranges_and_determinism(module):
    condition = torch.rand(2, 3, 32, 32)
    a = module.sample(condition, ["red", "blue"], num_inference_steps=3, seed=7)
    b = module.sample(condition, ["red", "blue"], num_inference_steps=3, seed=7, sampler="ddim")
    c = module.sample(condition, ["red", "blue"], num_inference_steps=3, seed=7, sampler="unipc")
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _conv_layouts(m: ControlNetModule) -> set[bool]:
    """For every 3x3 conv weight of the UNet, ControlNet and VAE: is it NHWC (channels_last)?
    (A 1x1 kernel or one input channel is both layouts at once.)"""
    parts = (m.unet, m.controlnet, m.vae)
    weights = [
        p
        for part in parts
        for p in part.parameters()
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
    ]
    return {w.is_contiguous(memory_format=torch.channels_last) for w in weights}


def test_memory_format_is_set_when_fit_starts_and_keeps_the_numbers(tiny_sd_path):
    import lightning as L
    from core_helpers import RandomPairsDataModule
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from cn_lightning.errors import ConfigError

    losses = {}
    for layout in ("auto", "contiguous"):
        torch.manual_seed(0)
        m = ControlNetModule(tiny_sd_path, learning_rate=1e-3, memory_format=layout)
        assert _conv_layouts(m) == {False}  # built NCHW; the layout is the trainer's business
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(m, datamodule=RandomPairsDataModule(n=4))
        assert _conv_layouts(m) == {layout == "auto"}
        m.eval()
        losses[layout] = m.compute_loss(random_batch(seed=9), generator=torch.Generator())
    # Two optimizer steps through other kernels: the same numbers up to rounding.
    torch.testing.assert_close(losses["auto"], losses["contiguous"], rtol=1e-4, atol=1e-6)

    m = ControlNetModule(tiny_sd_path, memory_format="channels_last")
    m.trainer = L.Trainer(accelerator="cpu", strategy=DeepSpeedStrategy(), logger=False)
    with pytest.raises(ConfigError, match="memory_format=channels_last .* DeepSpeed"):
        m.configure_model()
    with pytest.raises(ConfigError, match="memory_format must be one of auto"):
        ControlNetModule(tiny_sd_path, memory_format="nhwc")
