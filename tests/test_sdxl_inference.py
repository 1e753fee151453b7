"""SDXL end to end: a tiny SDXL ControlNet trained by the train CLI's ``train()`` with the default
callbacks (sample grids, condition fidelity, the convergence detector) on canny shards, exported,
then driven by ``python -m cn_lightning.generate`` and ``python -m cn_lightning.evaluate``
through diffusers' ``StableDiffusionXLControlNetPipeline``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from distributed_helpers import REPO
from hydra import compose, initialize_config_dir
from PIL import Image, ImageDraw

from cn_lightning.evaluate import main as evaluate_main
from cn_lightning.export import main as export_main
from cn_lightning.generate import main as generate_main
from cn_lightning.inference import (
    Control,
    GenerationSettings,
    build_pipeline,
    default_guidance,
    generate,
    load_controlnets,
    make_sampler,
    native_size,
)
from cn_lightning.models.backbone import load_backbone
from cn_lightning.train import train

PROMPT = "red circle with blue background"
SIZE = 32


def write_canny_shards(out: Path, num_samples: int = 8, per_shard: int = 4) -> str:
    """Circle pictures with their Canny edges as the ``canny`` condition; returns the folder."""
    from cn_lightning.conditions import get_extractor
    from cn_lightning.data.format import encode_image, write_shard_atomic
    from cn_lightning.data.synthetic import circle_sample

    canny = get_extractor("canny")
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(num_samples):
        _, target, prompt = circle_sample(i, SIZE, seed=0)
        samples.append(
            {
                "__key__": f"{i:06d}",
                "png": encode_image(target, "png"),
                "canny.png": encode_image(canny(target), "png"),
                "txt": prompt,
                "json": json.dumps({"i": i}),
            }
        )
    for s in range(0, num_samples, per_shard):
        write_shard_atomic(str(out / f"canny-{s // per_shard:06d}.tar"), samples[s : s + per_shard])
    return str(out)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_path, tmp_path_factory) -> dict:
    """``model=sdxl`` trained for 2 steps with the default callbacks (a grid, its fidelity and
    the detector at steps 0, 1 and 2), then exported with ``python -m cn_lightning.export``."""
    root = tmp_path_factory.mktemp("sdxl_inference")
    shards = write_canny_shards(root / "shards")
    run_dir = root / "run"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "model=sdxl",
                f"paths.output_dir={run_dir}",
                f"model.pretrained_model_path={tiny_sdxl_path}",
                "model.learning_rate=1e-3",
                "model.sample_steps=2",
                f"data.train_shards={shards}",
                f"data.val_shards={shards}",
                "data.condition_key=canny",
                "data.resolution=32",
                "data.batch_size=2",
                "data.num_workers=0",
                "data.shuffle_buffer=8",
                "data.resampled=true",
                "trainer.accelerator=cpu",
                "trainer.max_steps=2",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "+trainer.enable_model_summary=false",
                "logger=csv",
                "callbacks.model_checkpoint.every_n_train_steps=2",
                "callbacks.samples.every_n_steps=1",
                "callbacks.samples.num_samples=4",
                "callbacks.samples.grid_rows=2",
            ],
        )
    train(cfg)
    exported = root / "exported"
    assert export_main([str(run_dir), "--format", "diffusers", "--out", str(exported)]) == 0
    return {"run": run_dir, "exported": str(exported), "shards": shards, "root": root}


def _photo(path: Path) -> str:
    """A 48x40 picture with a few discs: real edges for Canny."""
    image = Image.new("RGB", (48, 40), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([4, 4, 24, 24], fill=(220, 40, 40))
    draw.ellipse([26, 14, 44, 34], fill=(240, 240, 60))
    image.save(path)
    return str(path)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sdxl_run_with_default_callbacks_logs_grids_fidelity_and_convergence(sdxl_run):
    run_dir = sdxl_run["run"]
    grids = sorted(p.name for p in (run_dir / "samples").glob("step_*.png"))
    assert grids == [f"step_{s:07d}.png" for s in (0, 1, 2)], grids
    # condition | sample | sample without prompt | target, 2 rows of 32 px tiles (enlarged to
    # the 128 px minimum): the SDXL samples are real images, not blanks.
    grid = np.asarray(Image.open(run_dir / "samples" / grids[-1]))
    assert grid.shape == (2 * 128, 4 * 128, 3) and grid[:, 128:256].std() > 0
    rows = _metrics(run_dir)
    fidelity = [float(r["val/fidelity"]) for r in rows if r.get("val/fidelity")]
    f1 = [float(r["val/edge_f1"]) for r in rows if r.get("val/edge_f1")]
    assert len(fidelity) == len(f1) == 3 and all(math.isfinite(v) for v in fidelity + f1)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    convergence = json.loads((run_dir / "convergence.json").read_text())
    text = json.dumps(convergence)
    assert "NaN" not in text and "fidelity" in text
    # The checkpoint holds the trainable branch only.
    saved = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["global_step"] == 2
    assert all(k.startswith("controlnet.") for k in saved["state_dict"])


def test_build_pipeline_is_diffusers_sdxl_controlnet_pipeline(sdxl_run, tiny_sdxl_path):
    backbone = load_backbone(tiny_sdxl_path)
    assert default_guidance(backbone) == 5.0 and native_size(backbone) == SIZE
    paths = [sdxl_run["exported"], str(sdxl_run["run"])]  # an export and a run directory
    nets = load_controlnets(paths, backbone, torch.float32)
    single = build_pipeline(backbone, nets[:1])
    assert isinstance(single, StableDiffusionXLControlNetPipeline)
    assert single.text_encoder_2 is backbone.text_encoder_2
    assert single.tokenizer_2 is backbone.tokenizer_2
    assert single.watermark is None and single.config.force_zeros_for_empty_prompt
    pair = build_pipeline(backbone, nets, force_zeros_for_empty_prompt=False)
    assert isinstance(pair.controlnet, MultiControlNetModel)
    assert not pair.config.force_zeros_for_empty_prompt
    # The run directory's checkpoint and its export are the same ControlNet.
    a, b = (n.state_dict() for n in nets)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.count_nonzero(a["controlnet_mid_block.weight"]) > 0, "training moved it"


def test_control_scale_zero_is_the_base_sdxl_pipeline(sdxl_run, tiny_sdxl_path, tmp_path):
    condition = _photo(tmp_path / "photo.png")

    def ours(scale: float, batch: int) -> list[np.ndarray]:
        control = Control(sdxl_run["exported"], condition, scale, "canny")
        settings = GenerationSettings(
            base=tiny_sdxl_path,
            controls=[control],
            prompt=PROMPT,
            steps=2,
            seed=3,
            batch_size=batch,
        )
        images, _ = generate(settings)
        assert settings.guidance_scale == 5.0 and (settings.width, settings.height) == (40, 32)
        return [_pixels(im) for im in images]

    # diffusers' own SDXL pipeline from the same folder, as a user would load it (its empty
    # negative prompt is a zero embedding: the model says force_zeros_for_empty_prompt).
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, local_files_only=True)
    base.scheduler = make_sampler("ddim", base.scheduler.config)
    reference = base(
        [PROMPT] * 2,
        num_inference_steps=2,
        height=32,
        width=40,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
    ).images
    reference = [_pixels(im) for im in reference]
    muted = ours(0.0, batch=2)
    assert all(np.array_equal(a, b) for a, b in zip(muted, reference, strict=True))
    # Not equal by accident: another seed, and the control, change the image.
    assert np.abs(reference[1] - reference[0]).max() > 0
    assert np.abs(ours(1.0, batch=1)[0] - reference[0]).max() > 0


def test_generate_cli_on_sdxl_composes_controlnets(sdxl_run, tiny_sdxl_path, tmp_path):
    photo = _photo(tmp_path / "photo.png")
    common = ["--base", tiny_sdxl_path, "--prompt", PROMPT, "--steps", "1", "--seed", "7"]
    single, pair = tmp_path / "single", tmp_path / "pair"
    argv = [*common, "--controlnet", sdxl_run["exported"], "--image", photo]
    assert generate_main([*argv, "--extractor", "canny", "--out", str(single)]) == 0
    assert sorted(p.name for p in single.iterdir()) == ["000007.png", "condition_0.png"]
    image = Image.open(single / "000007.png")
    assert image.size == (40, 32)  # the photo's aspect, shorter side at the native 32 px
    meta = json.loads(image.text["cn_lightning"])
    assert meta["guidance_scale"] == 5.0 and meta["base"] == tiny_sdxl_path
    assert "CFG scale: 5.0" in image.text["parameters"]
    # A second ControlNet (the run directory's checkpoint) at scale 0 adds nothing.
    pair_argv = [*common, "--controlnet", sdxl_run["exported"], str(sdxl_run["run"])]
    pair_argv += ["--image", photo, photo, "--extractor", "canny", "--scale", "1", "0"]
    assert generate_main([*pair_argv, "--out", str(pair)]) == 0
    assert np.array_equal(
        np.asarray(Image.open(pair / "000007.png")), np.asarray(Image.open(single / "000007.png"))
    )


def test_evaluate_cli_on_sdxl_takes_the_backbones_defaults(sdxl_run, tiny_sdxl_path, tmp_path):
    out = tmp_path / "eval"
    argv = [
        "--val-shards",
        sdxl_run["shards"],
        "--condition-key",
        "canny",
        "--base",
        tiny_sdxl_path,
        "--controlnet",
        sdxl_run["exported"],
        "--steps",
        "2",
        "--num-samples",
        "4",
        "--batch-size",
        "2",
        "--accelerator",
        "cpu",
        "--save-images",
        "--out",
        str(out),
    ]
    assert evaluate_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    # No --resolution, no --guidance: the base model's native size and SDXL's guidance.
    assert report["settings"]["resolution"] == SIZE and report["settings"]["guidance_scale"] == 5.0
    assert report["num_samples"] == 4
    assert {r["key"] for r in report["table"]} >= {"edge_f1", "edge_precision", "edge_recall"}
    assert all(math.isfinite(report["metrics"][k]) for k in ("edge_f1", "fidelity"))
    saved = sorted(p.name for p in (out / "images").iterdir())
    assert len(saved) == 4 and Image.open(out / "images" / saved[0]).size == (SIZE, SIZE)
    assert "32 px" in (out / "report.md").read_text()


def test_controlnet_for_another_backbone_is_refused_in_one_line(tiny_sdxl_path, tmp_path, capsys):
    from cli_helpers import cli_error

    from cn_lightning.models.checkpoints import save_controlnet_folder
    from cn_lightning.models.tiny import build_tiny_components

    sd_unet = build_tiny_components("test")[0]  # an SD UNet of the same widths
    sd_controlnet = ControlNetModel.from_unet(sd_unet, conditioning_embedding_out_channels=(16, 32))
    save_controlnet_folder(sd_controlnet, tmp_path / "sd_cn")
    photo = _photo(tmp_path / "photo.png")
    argv = ["--base", tiny_sdxl_path, "--controlnet", str(tmp_path / "sd_cn"), "--image", photo]
    line = cli_error(capsys, generate_main, [*argv, "--out", str(tmp_path / "o")])
    assert "does not fit the base model" in line and "cross_attention_dim" in line
