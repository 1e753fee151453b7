"""``sd_locked=False`` exports what was trained: the fine-tuned UNet goes with the ControlNet.

A tiny run trains the control branch and the UNet decoder with a real ``Trainer``. The end of
training writes ``<run>/unet/``; ``cn_lightning.export`` writes ``OUT/unet/`` (diffusers) or
``<stem>_unet.safetensors`` (original layout); and the pipeline that ``generate``/``evaluate``
build from any of these predicts exactly what the training module predicts, and not what the
base UNet predicts.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cn_lightning.errors import ConfigError
from cn_lightning.export import main as export_main
from cn_lightning.inference import build_pipeline, load_controlnets
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.checkpoints import export_from_trainer, save_controlnet_folder
from cn_lightning.models.controlnet import DECODER_PREFIXES
from cn_lightning.models.module import ControlNetModule

HINT = (4, 8, 8, 16)  # the original format's 4-stage hint encoder: condition = 8x latent
IMAGE, LATENT, COND = 16, 8, 16  # the default tiny run: condition = 2x latent


def _perturb(params, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _decoder_params(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if n.startswith(DECODER_PREFIXES)]


def _train_unlocked(
    tiny_sd_path: str, root: Path, hint: tuple[int, ...]
) -> tuple[Path, ControlNetModule]:
    """Three optimizer steps of an sd_locked=False run, then its end-of-training export."""
    cond = (
        IMAGE // 2 * 2 ** (len(hint) - 1)
    )  # the tiny VAE halves; the hint encoder halves per stage
    unet = load_backbone(tiny_sd_path).unet
    start = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    _perturb(start.parameters(), seed=3)
    start_dir = save_controlnet_folder(start, root / "start")

    L.seed_everything(0)
    module = ControlNetModule(
        tiny_sd_path,
        controlnet_path=str(start_dir),
        sd_locked=False,
        learning_rate=1e-3,
        decoder_learning_rate=1e-3,
    )
    before = [p.detach().clone() for p in _decoder_params(module.unet)]
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "image": torch.rand(3, IMAGE, IMAGE, generator=g) * 2 - 1,
            "condition": (torch.rand(3, cond, cond, generator=g) > 0.5).float(),
            "prompt": f"red circle {i}",
        }
        for i in range(2)
    ]
    run_dir = root / "run"
    trainer = L.Trainer(
        default_root_dir=run_dir,
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)
        ],
    )
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=2))
    assert any(
        not torch.equal(a, b) for a, b in zip(before, _decoder_params(module.unet), strict=True)
    )
    # Larger decoder changes than 3 small steps make, so "differs from the base UNet" is
    # unambiguous.
    _perturb(_decoder_params(module.unet), seed=4)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    export_from_trainer(trainer, module, run_dir / "controlnet")
    return run_dir, module.eval()


@pytest.fixture(scope="module")
def run(tiny_sd_path, tmp_path_factory) -> tuple[Path, ControlNetModule]:
    """The default tiny hint encoder (condition = 2x latent): what generate/evaluate accept."""
    return _train_unlocked(tiny_sd_path, tmp_path_factory.mktemp("unlocked"), (16, 32))


@pytest.fixture(scope="module")
def run4(tiny_sd_path, tmp_path_factory) -> tuple[Path, ControlNetModule]:
    """The original format's 4-stage hint encoder (condition = 8x latent), for --format original."""
    return _train_unlocked(tiny_sd_path, tmp_path_factory.mktemp("unlocked4"), HINT)


def _inputs(module: ControlNetModule, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, LATENT, LATENT, generator=g)
    condition = torch.rand(2, 3, COND, COND, generator=g)
    return noisy, torch.tensor([10, 900]), module.encode_prompt(["a red circle", ""]), condition


@torch.no_grad()
def _pipeline_prediction(pipe, noisy, t, emb, condition) -> torch.Tensor:
    """What diffusers' ControlNet pipeline computes per step: ControlNet residuals into the UNet."""
    down, mid = pipe.controlnet(
        noisy, t, encoder_hidden_states=emb, controlnet_cond=condition, return_dict=False
    )
    return pipe.unet(
        noisy,
        t,
        encoder_hidden_states=emb,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]


def _generate_pipeline(tiny_sd_path: str, source: str):
    """The pipeline ``generate`` builds for ``--base tiny --controlnet source``."""
    backbone = load_backbone(tiny_sd_path, "fp32")
    pipe = build_pipeline(backbone, load_controlnets([source], backbone, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_end_of_training_export_writes_the_trained_unet(run, tiny_sd_path):
    run_dir, module = run
    unet = UNet2DConditionModel.from_pretrained(run_dir / "unet", local_files_only=True)
    base = load_backbone(tiny_sd_path).unet.state_dict()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert unet.dtype == torch.float32 and public(unet.config) == public(module.unet.config)
    trained, ours = module.unet.state_dict(), unet.state_dict()
    assert ours.keys() == base.keys()
    for key, value in ours.items():
        expected = trained[key] if key.startswith(DECODER_PREFIXES) else base[key]
        assert torch.equal(value, expected), key
    assert any(not torch.equal(ours[k], base[k]) for k in ours if k.startswith(DECODER_PREFIXES))


@pytest.mark.parametrize("which", ["run", "run/controlnet", "export", "export-fp16"])
def test_pipeline_predicts_what_the_module_trained(run, tiny_sd_path, tmp_path, which, capsys):
    run_dir, module = run
    if which == "run":
        source = run_dir
    elif which == "run/controlnet":
        source = run_dir / "controlnet"
    else:
        source = tmp_path / "cn"
        dtype = ["--dtype", "fp16"] if which == "export-fp16" else []
        assert (
            export_main([str(run_dir), "--format", "diffusers", "--out", str(source), *dtype]) == 0
        )
        assert (source / "unet" / "config.json").is_file() and (source / "config.json").is_file()
        if dtype:  # --dtype applies to the UNet too
            weights = load_file(str(source / "unet" / "diffusion_pytorch_model.safetensors"))
            assert {v.dtype for v in weights.values()} == {torch.float16}
            return
    capsys.readouterr()
    pipe = _generate_pipeline(tiny_sd_path, str(source))
    assert "using the fine-tuned UNet (sd_locked=false)" in capsys.readouterr().out
    inputs = _inputs(module)
    with torch.no_grad():
        expected = module(*inputs)
    torch.testing.assert_close(_pipeline_prediction(pipe, *inputs), expected, rtol=0, atol=1e-6)

    # The same ControlNet with the base model's UNet predicts something else.
    base_backbone = load_backbone(tiny_sd_path, "fp32")
    stock = _pipeline_prediction(
        pipe.__class__(**{**pipe.components, "unet": base_backbone.unet}), *inputs
    )
    assert (stock - expected).abs().max() > 1e-3


def test_pipeline_images_match_the_module_sampler(run, tiny_sd_path):
    run_dir, module = run
    pipe = _generate_pipeline(tiny_sd_path, str(run_dir))
    condition = torch.rand(1, 3, COND, COND, generator=torch.Generator().manual_seed(5))
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(module.noise_scheduler.config)
    ours = pipe(
        "red circle",
        image=condition,
        height=COND,
        width=COND,
        num_inference_steps=3,
        guidance_scale=3.0,
        latents=latents,
        output_type="pt",
    ).images
    reference = module.sample(
        condition, ["red circle"], num_inference_steps=3, guidance_scale=3.0, seed=7
    )
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=0)


def test_original_format_writes_the_unet_in_sd_layout(run4, tiny_sd_path, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from cn_lightning.models.checkpoints import find_companion_unet, load_any_controlnet

    run_dir, module = run4
    source = tmp_path / "control_tiny.safetensors"
    assert export_main([str(run_dir), "--format", "original", "--out", str(source)]) == 0
    unet_file = load_file(str(tmp_path / "control_tiny_unet.safetensors"))
    assert unet_file and all(k.startswith("model.diffusion_model.") for k in unet_file)
    unet = UNet2DConditionModel.from_pretrained(run_dir / "unet", local_files_only=True)
    back = convert_ldm_unet_checkpoint(
        unet_file, dict(unet.config)
    )  # diffusers' own SD-file reader
    expected = unet.state_dict()
    assert back.keys() == expected.keys() and all(
        torch.equal(back[k], expected[k]) for k in expected
    )

    # generate's loading path for an original-format file (its check_fits needs a real 8x VAE):
    # the ControlNet and its X_unet.safetensors drive the base UNet to the module's predictions.
    backbone = load_backbone(tiny_sd_path, "fp32")
    controlnet, weights = load_any_controlnet(source, unet=backbone.unet)
    companion = find_companion_unet(source, None)
    assert (
        weights is None
        and companion is not None
        and companion.original == tmp_path / "control_tiny_unet.safetensors"
    )
    pipe = build_pipeline(backbone, [controlnet])
    pipe.unet = companion.build(backbone.unet, torch.float32)
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, LATENT, LATENT, generator=g),
        torch.tensor([10, 900]),
        module.encode_prompt(["a red circle", ""]),
        torch.rand(2, 3, 64, 64, generator=g),
    )
    with torch.no_grad():
        expected_pred = module(*inputs)
    torch.testing.assert_close(
        _pipeline_prediction(pipe, *inputs), expected_pred, rtol=0, atol=1e-6
    )

    # ... and back to a diffusers folder with --base: the same UNet, bit for bit.
    out = tmp_path / "again"
    assert (
        export_main(
            [str(source), "--format", "diffusers", "--out", str(out), "--base", tiny_sd_path]
        )
        == 0
    )
    again = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).state_dict()
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_evaluate_uses_the_fine_tuned_unet(run, tiny_sd_path, tmp_path):
    from cn_lightning.evaluation import EvalConfig
    from cn_lightning.inference import PipelineSource

    run_dir, module = run
    cfg = EvalConfig(
        val_shards="unused",
        condition_key="outline",
        out=str(tmp_path),
        base=tiny_sd_path,
        controlnet=str(run_dir),
    )
    source = PipelineSource(cfg, torch.device("cpu"), torch.float32)
    ours = source.pipe.unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in module.unet.state_dict().items())


def test_export_options_and_errors(run, tmp_path, capsys):
    from cli_helpers import cli_error

    run_dir, module = run
    assert (
        export_main(
            [
                str(run_dir),
                "--format",
                "diffusers",
                "--out",
                str(tmp_path / "only"),
                "--controlnet-only",
            ]
        )
        == 0
    )
    assert (tmp_path / "only" / "config.json").is_file() and not (
        tmp_path / "only" / "unet"
    ).exists()

    moved = tmp_path / "moved.ckpt"
    hparams = {**dict(module.hparams), "pretrained_model_path": str(tmp_path / "gone")}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, moved)
    line = cli_error(
        capsys,
        export_main,
        [
            str(moved),
            "--format",
            "diffusers",
            "--out",
            str(tmp_path / "o"),
            "--base",
            str(tmp_path / "gone"),
        ],
    )
    assert "does not exist" in line
    line = cli_error(
        capsys, export_main, [str(moved), "--format", "diffusers", "--out", str(tmp_path / "o")]
    )
    assert "sd_locked=false" in line and "--base" in line and "--controlnet-only" in line


def test_two_controlnets_with_their_own_unets_are_refused(run, tiny_sd_path):
    run_dir, _ = run
    backbone = load_backbone(tiny_sd_path, "fp32")
    with pytest.raises(ConfigError, match="each come with a fine-tuned UNet"):
        load_controlnets([str(run_dir), str(run_dir / "controlnet")], backbone, torch.float32)
