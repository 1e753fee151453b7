"""Export of trained ControlNets (diffusers and original formats) and import for fine-tuning.

Checkpoints come from a real Lightning ``Trainer`` run of ``ControlNetModule`` on the tiny model;
the exported ControlNet must give bit-identical residuals to the training module and drive
diffusers' ``StableDiffusionControlNetPipeline`` to the same images as the module's own sampler.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cn_lightning.cli import run_cli
from cn_lightning.export import main
from cn_lightning.models.checkpoints import find_checkpoint, save_controlnet_folder
from cn_lightning.models.convert_original import controlnet_to_original
from cn_lightning.models.module import ControlNetModule

EXPORT_HINT = (4, 8, 8, 16)  # the original format needs a 4-stage hint encoder (8x the latent)


def _pairs(image_size: int, cond_size: int, n: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "image": torch.rand(3, image_size, image_size, generator=g) * 2 - 1,
            "condition": (torch.rand(3, cond_size, cond_size, generator=g) > 0.5).float(),
            "prompt": f"red circle {i}",
        }
        for i in range(n)
    ]
    return DataLoader(items, batch_size=n)


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Random values everywhere, so zero convs cannot hide a swapped or dropped tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _train_run(run: Path, module: ControlNetModule, image_size: int, cond_size: int) -> Path:
    """One optimizer step with a real Trainer, then a checkpoint of perturbed weights as
    last.ckpt."""
    trainer = L.Trainer(
        default_root_dir=run,
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=run / "checkpoints", save_last=True)
        ],
    )
    trainer.fit(module, train_dataloaders=_pairs(image_size, cond_size))
    _perturb(module.controlnet)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def _residuals(
    controlnet: ControlNetModel, module: ControlNetModule, latent: int, cond: int, seed: int = 0
):
    # Every ControlNet in one layout (training made the module's NHWC: model.memory_format), so
    # all run the same kernels and bit-identical weights give bit-identical residuals.
    controlnet = copy.deepcopy(controlnet).to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, latent, latent, generator=g)
    condition = torch.rand(2, 3, cond, cond, generator=g)
    emb = module.encode_prompt(["a red circle", ""])
    with torch.no_grad():
        down, mid = controlnet(noisy, torch.tensor([10, 900]), emb, condition, return_dict=False)
    return [*down, mid]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.count_nonzero(a[-1]) > 0


@pytest.fixture(scope="module")
def default_run(tiny_sd_path, tmp_path_factory) -> tuple[Path, ControlNetModule]:
    """A run of the default tiny module (hint encoder (16, 32): condition = 2x latent)."""
    L.seed_everything(0)
    module = ControlNetModule(tiny_sd_path, learning_rate=1e-3)
    return _train_run(tmp_path_factory.mktemp("run_default"), module, 32, 32), module


@pytest.fixture(scope="module")
def start_controlnet(tiny_sd_path, tmp_path_factory) -> Path:
    """A released-style ControlNet with the original's 4-stage hint encoder, as a diffusers
    folder."""
    from cn_lightning.models.backbone import load_backbone

    unet = load_backbone(tiny_sd_path).unet
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EXPORT_HINT)
    _perturb(controlnet, seed=3)
    return save_controlnet_folder(controlnet, tmp_path_factory.mktemp("start") / "controlnet")


@pytest.fixture(scope="module")
def hint4_run(tiny_sd_path, start_controlnet, tmp_path_factory) -> tuple[Path, ControlNetModule]:
    """A run fine-tuned from ``start_controlnet`` (condition = 8x latent: 64 px for a 16 px
    image)."""
    L.seed_everything(0)
    module = ControlNetModule(
        tiny_sd_path, controlnet_path=str(start_controlnet), learning_rate=1e-3
    )
    return _train_run(tmp_path_factory.mktemp("run_hint4"), module, 16, 64), module


def test_diffusers_export_gives_module_residuals_and_pipeline_matches_sampler(
    default_run, tmp_path
):
    run, module = default_run
    assert main([str(run), "--format", "diffusers", "--out", str(tmp_path / "cn")]) == 0
    exported = ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True)
    assert exported.dtype == torch.float32
    _assert_same(
        _residuals(exported, module, 16, 32), _residuals(module.controlnet, module, 16, 32)
    )

    pipe = StableDiffusionControlNetPipeline(
        vae=module.vae,
        text_encoder=module.text_encoder,
        tokenizer=module.tokenizer,
        unet=module.unet,
        controlnet=exported,
        scheduler=DDIMScheduler.from_config(module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ours = pipe(
        "red circle",
        image=condition,
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=3.0,
        latents=latents,
        output_type="pt",
    ).images
    module.eval()
    reference = module.sample(
        condition, ["red circle"], num_inference_steps=3, guidance_scale=3.0, seed=7
    )
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=0)


def test_original_export_loads_in_diffusers_and_round_trips_bit_identical(
    hint4_run, tiny_sd_path, tmp_path
):
    run, module = hint4_run
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "control_tiny.safetensors"
    assert main([str(ckpt), "--format", "original", "--out", str(out)]) == 0
    original = load_file(str(out))
    assert all(k.startswith("control_model.") for k in original)
    assert {k.split(".")[1] for k in original} == {
        "input_hint_block",
        "input_blocks",
        "zero_convs",
        "middle_block",
        "middle_block_out",
        "time_embed",
    }
    expected = controlnet_to_original(module.controlnet.state_dict(), module.controlnet.config)
    assert (
        all(torch.equal(original[k], expected[k]) for k in expected)
        and original.keys() == expected.keys()
    )

    # diffusers' own single-file loader reads it offline, given a local config.
    module.controlnet.save_config(tmp_path / "config")
    loaded = ControlNetModel.from_single_file(
        str(out), config=str(tmp_path / "config"), local_files_only=True
    )
    _assert_same(_residuals(loaded, module, 8, 64), _residuals(module.controlnet, module, 8, 64))

    # original -> diffusers (through diffusers' converter) -> original: bit-identical file contents.
    # A tiny architecture is not one of the shipped SD configs: --base names it.
    assert (
        main(
            [
                str(out),
                "--format",
                "diffusers",
                "--out",
                str(tmp_path / "folder"),
                "--base",
                tiny_sd_path,
            ]
        )
        == 0
    )
    assert (
        main(
            [str(tmp_path / "folder"), "--format", "original", "--out", str(tmp_path / "again.pth")]
        )
        == 0
    )
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert again.keys() == original.keys()
    assert all(
        again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original
    )


def test_fp16_export_and_run_directory_lookup(hint4_run, tmp_path):
    run, module = hint4_run
    assert find_checkpoint(run) == run / "checkpoints" / "last.ckpt"
    assert (
        main([str(run), "--format", "original", "--out", str(tmp_path / "half"), "--dtype", "fp16"])
        == 0
    )
    half = load_file(str(tmp_path / "half.safetensors"))
    key = "control_model.middle_block_out.0.weight"
    assert half[key].dtype == torch.float16
    assert torch.equal(half[key], module.controlnet.controlnet_mid_block.weight.detach().half())
    assert (
        main(
            [str(run), "--format", "diffusers", "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]
        )
        == 0
    )
    weights = load_file(str(tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}


def test_fine_tuning_starts_from_either_format_with_the_source_residuals(
    tiny_sd_path, start_controlnet, hint4_run, tmp_path
):
    _, module = hint4_run
    source = ControlNetModel.from_pretrained(start_controlnet, local_files_only=True)
    original = tmp_path / "start.safetensors"
    assert main([str(start_controlnet), "--format", "original", "--out", str(original)]) == 0
    for path in (start_controlnet, original):
        started = ControlNetModule(tiny_sd_path, controlnet_path=str(path))
        assert all(
            p.requires_grad and p.dtype == torch.float32 for p in started.controlnet.parameters()
        )
        _assert_same(
            _residuals(started.controlnet, module, 8, 64), _residuals(source, module, 8, 64)
        )


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(main, list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("cn_lightning: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_input_gives_one_clear_line(default_run, tmp_path, capsys):
    run, _ = default_run
    line = _cli_error(
        capsys, str(tmp_path / "nope.ckpt"), "--format", "diffusers", "--out", str(tmp_path / "o")
    )
    assert "nope.ckpt" in line and "does not exist" in line
    line = _cli_error(capsys, str(run), "--format", "onnx", "--out", str(tmp_path / "o"))
    assert "invalid choice: 'onnx'" in line
    # The default tiny hint encoder has 2 stages (a 2x VAE); the original format needs exactly 4.
    line = _cli_error(
        capsys, str(run), "--format", "original", "--out", str(tmp_path / "o.safetensors")
    )
    assert "no original-format equivalent" in line and "[16, 32]" in line and "2x" in line
    assert line.endswith("export it with --format diffusers")
    (tmp_path / "empty_run").mkdir()
    line = _cli_error(
        capsys, str(tmp_path / "empty_run"), "--format", "diffusers", "--out", str(tmp_path / "o")
    )
    assert "no checkpoint" in line
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    line = _cli_error(capsys, str(junk), "--format", "diffusers", "--out", str(tmp_path / "o"))
    assert "junk.ckpt" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("variant", ["sd15", "sd21"])
def test_original_file_without_base_gets_the_shipped_config(variant: str) -> None:
    from diffusers import UNet2DConditionModel

    from cn_lightning.models.checkpoints import original_controlnet_config
    from cn_lightning.models.single_file import config_dir

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(config_dir(variant) / "unet"))
        )
        full = ControlNetModel.from_unet(unet)
    config = original_controlnet_config(controlnet_to_original(full.state_dict(), full.config))
    for key in (
        "cross_attention_dim",
        "use_linear_projection",
        "attention_head_dim",
        "block_out_channels",
    ):
        assert config[key] == full.config[key] or list(config[key]) == list(full.config[key]), key


def test_original_file_for_another_architecture_is_refused(tiny_sd_path, tmp_path) -> None:
    from cn_lightning.errors import CheckpointFormatError
    from cn_lightning.models.backbone import load_backbone
    from cn_lightning.models.checkpoints import load_original_controlnet, save_original
    from cn_lightning.models.tiny import build_tiny_components

    other = build_tiny_components("small")[0]  # wider UNet than the test backbone
    controlnet = ControlNetModel.from_unet(other, conditioning_embedding_out_channels=EXPORT_HINT)
    path = save_original(
        controlnet_to_original(controlnet.state_dict(), controlnet.config),
        tmp_path / "c.safetensors",
    )
    with pytest.raises(
        CheckpointFormatError, match=r"c\.safetensors: does not fit .*size mismatch"
    ) as info:
        load_original_controlnet(path, unet=load_backbone(tiny_sd_path).unet)
    assert "\n" not in str(info.value)


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert all(
        opt in text for opt in ("--format", "--out", "--dtype", "--base", "{diffusers,original}")
    )


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    """``python -m cn_lightning.export`` itself: bad input exits 2 with one line, no traceback."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "cn_lightning.export",
        str(tmp_path / "run"),
        "--format",
        "original",
        "--out",
        "x",
    ]
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"cn_lightning: error: '{tmp_path / 'run'}' does not exist: "
        "expected a .ckpt file, a DeepSpeed checkpoint or a run directory"
    ]


def test_unlocked_decoder_is_noted_and_left_out(tiny_sd_path, tmp_path, capsys):
    module = ControlNetModule(tiny_sd_path, sd_locked=False)
    _perturb(module.controlnet)
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
        tmp_path / "m.ckpt",
    )
    assert (
        main([str(tmp_path / "m.ckpt"), "--format", "diffusers", "--out", str(tmp_path / "cn")])
        == 0
    )
    assert "fine-tuned UNet decoder tensors (sd_locked=false)" in capsys.readouterr().err
    exported = ControlNetModel.from_pretrained(tmp_path / "cn", local_files_only=True)
    _assert_same(
        _residuals(exported, module, 16, 32), _residuals(module.controlnet, module, 16, 32)
    )


def test_generate_reads_a_run_directory_directly(default_run, tiny_sd_path, tmp_path):
    from PIL import Image

    from cn_lightning.generate import main as generate_main

    run, _ = default_run
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "cond.png")
    argv = [
        "--base",
        tiny_sd_path,
        "--controlnet",
        str(run),
        "--image",
        str(tmp_path / "cond.png"),
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--out",
        str(tmp_path / "out"),
    ]
    assert generate_main(argv) == 0
    assert Image.open(tmp_path / "out" / "000000.png").size == (32, 32)
