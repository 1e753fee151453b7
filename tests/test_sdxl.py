"""SDXL as a backbone: the tiny SDXL model, the module's two-encoder conditioning, and a run of
the training CLI (``model=sdxl``) that checkpoints, resumes and exports a ControlNet which
diffusers' ``StableDiffusionXLControlNetPipeline`` drives with the module's own residuals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides

from cn_lightning.errors import BackboneLoadError, ConfigError
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.checkpoints import export_controlnet
from cn_lightning.models.module import ControlNetModule

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_path, tmp_path_factory) -> Path:
    """``model=sdxl`` through the training CLI under bf16-mixed: 2 steps, then resumed to 4."""
    from data_helpers import make_circle_shards

    tmp = tmp_path_factory.mktemp("sdxl_run")
    make_circle_shards(tmp / "shards", num_samples=16, size=32)
    run_dir = tmp / "run"
    args = [
        *tiny_run_overrides(tiny_sdxl_path, str(tmp / "shards"), run_dir, steps=2),
        "model=sdxl",
        "model.learning_rate=1e-3",
        "model.sample_steps=2",
        "trainer.precision=bf16-mixed",
    ]
    env = subprocess_env(tmp)
    run_train(args, env, tmp)
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    # The same run with more steps resumes from the run directory's last.ckpt; this time with
    # the default callbacks, so the sample grid (SampleGridLogger) draws SDXL samples at the end.
    resumed = [
        a.replace("max_steps=2", "max_steps=4")
        for a in args
        if not a.startswith(("callbacks", "logger"))
    ]
    resumed += [
        "logger=none",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.at_start=false",
        "callbacks.samples.num_samples=2",
        "callbacks.samples.seeds_per_sample=1",
        # The FLOP count a GPU run does by default (MFU) runs SDXL's pooled prompt and ids too.
        "callbacks.throughput.count_flops=true",
        "callbacks.throughput.peak_tflops=1.0",
    ]
    result = run_train(resumed, env, tmp)
    assert "resuming from" in result.stderr + result.stdout
    assert list((run_dir / "samples").glob("step_*.png")), "SDXL sample grid at the end"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    flops = [s.get("flops_per_sample") for s in last["callbacks"].values() if isinstance(s, dict)]
    assert any(f and f > 1e6 for f in flops), flops
    return run_dir


def test_tiny_sdxl_is_a_diffusers_sdxl_pipeline(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    image = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    backbone = load_backbone(tiny_sdxl_path)
    assert backbone.is_sdxl and backbone.text_encoder_2 is not None
    assert not any(p.requires_grad for p in backbone.text_encoder_2.parameters())


def test_sdxl_prompts_and_time_ids_are_the_pipelines(tiny_sdxl_path):
    module = ControlNetModule(tiny_sdxl_path)
    assert module.is_sdxl and "text_encoder_2" in module._frozen
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    hidden, pooled = module.encode_text([PROMPT, ""])
    emb, neg, pooled_emb, pooled_neg = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=True, negative_prompt=""
    )
    # The empty prompt (the dropped half of training) goes through both encoders, as "" does.
    # (close, not equal: a batch of 2 may take other matmul kernels than the pipeline's 1)
    assert hidden.shape == (2, 16, 64) and pooled.shape == (2, 32)
    assert torch.allclose(hidden, torch.cat([emb, neg]), atol=1e-6)
    assert torch.allclose(pooled, torch.cat([pooled_emb, pooled_neg]), atol=1e-6)
    assert torch.allclose(module.encode_prompt([PROMPT]), emb, atol=1e-6)

    default = module.added_cond_kwargs(pooled, (32, 32))
    expected = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(default["time_ids"], expected.repeat(2, 1))
    batch = {"original_size": torch.tensor([[64, 48], [40, 40]]), "crop_top_left": [(8, 0), (0, 4)]}
    ids = module.added_cond_kwargs(pooled, (32, 32), batch)["time_ids"]
    assert ids.tolist() == [[64, 48, 8, 0, 32, 32], [40, 40, 0, 4, 32, 32]]
    with pytest.raises(ConfigError, match="added_cond_kwargs"):
        module(torch.zeros(1, 4, 16, 16), torch.tensor([1]), hidden[:1], torch.zeros(1, 3, 32, 32))


def test_sdxl_sample_grid_and_separate_vae(tiny_sdxl_path, tmp_path):
    vae_dir = tmp_path / "vae_fix"
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path).vae.save_pretrained(vae_dir)
    module = ControlNetModule(tiny_sdxl_path, vae_path=str(vae_dir), sample_steps=2)
    assert module.hparams.vae_path == str(vae_dir)
    with_prompt, without = module.sample_with_and_without_prompt(
        torch.rand(2, 3, 32, 32), [PROMPT, "x"], seed=3
    )
    assert with_prompt.shape == without.shape == (2, 3, 32, 32)
    assert torch.isfinite(with_prompt).all() and not torch.equal(with_prompt, without)
    with pytest.raises(BackboneLoadError, match="vae_path"):
        ControlNetModule(tiny_sdxl_path, vae_path=str(tmp_path))


def test_sdxl_train_cli_checkpoints_resumes_and_exports(sdxl_run, tiny_sdxl_path, tmp_path):
    ckpt = torch.load(sdxl_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["hyper_parameters"]["pretrained_model_path"] == tiny_sdxl_path
    # Only the trainable branch is checkpointed: the add_embedding copy, no frozen backbone.
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith("controlnet.") for k in keys)
    assert "controlnet.add_embedding.linear_1.weight" in keys
    run_export = sdxl_run / "controlnet"
    assert (run_export / "diffusion_pytorch_model.safetensors").is_file()
    out = export_controlnet(sdxl_run, tmp_path / "exported", fmt="diffusers")
    a = ControlNetModel.from_pretrained(out, local_files_only=True)
    b = ControlNetModel.from_pretrained(run_export, local_files_only=True)
    assert a.config.addition_embed_type == "text_time"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_exported_sdxl_controlnet_drives_the_diffusers_pipeline(sdxl_run, tiny_sdxl_path):
    controlnet = ControlNetModel.from_pretrained(sdxl_run / "controlnet", local_files_only=True)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_path, controlnet=controlnet, local_files_only=True
    )
    module = ControlNetModule(tiny_sdxl_path)
    state = torch.load(sdxl_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    module.eval()

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    condition = torch.rand(1, 3, 32, 32, generator=g)
    t = torch.tensor(700)
    # The pipeline's way: its prompt encoding (with "" as negative), time ids and control image.
    emb, neg, pooled, pooled_neg = pipe.encode_prompt(
        PROMPT, do_classifier_free_guidance=True, negative_prompt=""
    )
    time_ids = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), emb.dtype, pipe.text_encoder_2.config.projection_dim
    )
    image = pipe.prepare_image(
        condition, 32, 32, 1, 1, "cpu", torch.float32, do_classifier_free_guidance=True
    )
    added = {"text_embeds": torch.cat([pooled_neg, pooled]), "time_ids": time_ids.repeat(2, 1)}
    with torch.no_grad():
        down, mid = pipe.controlnet(
            latents,
            t,
            encoder_hidden_states=torch.cat([neg, emb]),
            controlnet_cond=image,
            conditioning_scale=1.0,
            guess_mode=False,
            added_cond_kwargs=added,
            return_dict=False,
        )
        pipe_pred = pipe.unet(
            latents,
            t,
            encoder_hidden_states=torch.cat([neg, emb]),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    # The module's own forward, its residuals caught on the way.
    caught = []
    hook = module.controlnet.register_forward_hook(lambda m, i, out: caught.append(out))
    module.controlnet.to(memory_format=torch.contiguous_format)
    text, pooled_m = module.encode_text(["", PROMPT])
    with torch.no_grad():
        pred = module(
            latents,
            t.expand(2),
            text,
            condition.expand(2, -1, -1, -1),
            module.added_cond_kwargs(pooled_m, (32, 32)),
        )
    hook.remove()
    m_down, m_mid = caught[0]
    assert torch.count_nonzero(mid) > 0, "training moved the zero convolutions"
    assert torch.allclose(m_mid, mid, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(m_down, down, strict=True))
    assert torch.allclose(pred, pipe_pred, atol=1e-5)
    # And the pipeline runs end to end with it.
    out = pipe(
        PROMPT, image=condition, num_inference_steps=2, height=32, width=32, output_type="pt"
    )
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_sdxl_controlnet_round_trips_through_the_original_format(tiny_sdxl_path):
    from diffusers import UNet2DConditionModel

    from cn_lightning.models.convert_original import (
        controlnet_to_original,
        original_to_controlnet,
    )

    unet = UNet2DConditionModel.from_pretrained(Path(tiny_sdxl_path) / "unet")
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 96, 256)
    )
    state = controlnet.state_dict()
    original = controlnet_to_original(state, controlnet.config)
    assert "control_model.label_emb.0.0.bias" in original  # SDXL's add_embedding
    back = original_to_controlnet(original, controlnet.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
