"""Evaluation over validation shards: condition fidelity, FID and CLIP score, reports, splitting."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli_error
from diffusers import ControlNetModel
from PIL import Image

from cn_lightning.evaluate import main
from cn_lightning.evaluation import EvalConfig, build_metrics, evaluate_split
from cn_lightning.inference import PipelineSource
from cn_lightning.metrics import condition_fidelity
from cn_lightning.metrics.fidelity import disc_from_outline
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.checkpoints import save_controlnet_folder

SIZE = 32


def _shard_conditions(shards: str) -> dict[str, np.ndarray]:
    """key -> outline condition (H, W) uint8, read straight from the tar."""
    out = {}
    with tarfile.open(shards) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".outline.png"):
                data = tar.extractfile(member).read()
                out[member.name.split(".")[0]] = np.asarray(
                    Image.open(io.BytesIO(data)).convert("L")
                )
    return out


def _as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) arrays -> (B, 3, H, W) in [0, 1]."""
    rgb = [np.repeat(a[:, :, None], 3, 2) if a.ndim == 2 else a for a in images]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def assets(tiny_sd_path, tmp_path_factory) -> dict:
    import open_clip
    import torchvision
    from safetensors.torch import save_file

    from cn_lightning.data.synthetic import ensure_shards

    root = tmp_path_factory.mktemp("evaluate")
    shards = ensure_shards(str(root / "shards"), num_samples=6, size=SIZE, seed=0)
    controlnet = ControlNetModel.from_unet(
        load_backbone(tiny_sd_path).unet, conditioning_embedding_out_channels=(16, 32)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_controlnet_folder(controlnet, root / "controlnet")
    # Randomly initialised Inception (torchvision's layout = torch-fidelity's, with its 1008-way
    # fc): this tests the local-weights path, not FID values.
    inception = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False
    ).state_dict()
    inception["fc.weight"], inception["fc.bias"] = (
        torch.randn(1008, 2048, generator=g) * 0.01,
        torch.zeros(1008),
    )
    torch.save(inception, root / "inception.pth")
    # A tiny open_clip model in open_clip's local-dir layout (config + weights).
    clip_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 16,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": clip_cfg, "preprocess_cfg": {}})
    )
    torch.manual_seed(0)
    clip = open_clip.CLIP(**clip_cfg)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()},
        str(root / "clip" / "open_clip_model.safetensors"),
    )
    return {
        "root": root,
        "shards": shards,
        "base": tiny_sd_path,
        "controlnet": str(root / "controlnet"),
        "inception": str(root / "inception.pth"),
        "clip": f"local-dir:{root / 'clip'}",
    }


def _common(assets: dict, out: Path) -> list[str]:
    return [
        "--val-shards",
        assets["shards"],
        "--condition-key",
        "outline",
        "--resolution",
        str(SIZE),
        "--out",
        str(out),
        "--accelerator",
        "cpu",
    ]


def test_report_with_fid_and_clip_matches_the_saved_images(assets, tmp_path):
    out = tmp_path / "eval"
    argv = [
        *_common(assets, out),
        "--base",
        assets["base"],
        "--controlnet",
        assets["controlnet"],
        "--steps",
        "2",
        "--num-samples",
        "5",
        "--batch-size",
        "4",
        "--save-images",
        "--fid-weights",
        assets["inception"],
        "--fid-feature",
        "64",
        "--clip-model",
        assets["clip"],
        "--wandb",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (
        report["num_samples"] == 5 and len(report["samples"]) == 5
    )  # 5 of 6: the second batch is cut
    metrics = report["metrics"]
    assert set(metrics) == {"circle_iou", "fidelity", "fid", "clip_score"}
    assert np.isfinite(metrics["fid"]) and metrics["fid"] >= 0
    assert 0 <= metrics["clip_score"] <= 100

    # Per-sample fidelity is the fidelity metric of the saved 8-bit image and the shard's condition.
    conditions = _shard_conditions(assets["shards"])
    keys = [s["key"] for s in report["samples"]]
    generated = [np.asarray(Image.open(out / "images" / f"{k}.png").convert("RGB")) for k in keys]
    expected = condition_fidelity(
        _as_tensor(generated), _as_tensor([conditions[k] for k in keys]), "outline"
    )
    reported = torch.tensor([s["fidelity"] for s in report["samples"]])
    torch.testing.assert_close(reported, expected["fidelity"], rtol=0, atol=1e-6)
    assert metrics["fidelity"] == pytest.approx(float(expected["fidelity"].mean()), abs=1e-6)
    assert metrics["clip_score"] == pytest.approx(
        np.mean([s["clip_score"] for s in report["samples"]]), abs=1e-4
    )

    table = (out / "report.md").read_text()
    assert "| metric | value |" in table and f"| fidelity | {metrics['fidelity']:.4f} |" in table
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run missing"


def test_fidelity_of_known_images_is_hand_computed(assets, tmp_path):
    """Images drawn from each condition's own circle: a perfect disc scores 1, a blank image 0, a
    half disc |half| / |disc| (its IoU with the disc)."""
    conditions = _shard_conditions(assets["shards"])
    keys = sorted(conditions)[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    expected = []
    for i, key in enumerate(keys):
        disc = disc_from_outline(torch.from_numpy(conditions[key] > 127)).numpy()
        if i % 2 == 1:  # blank
            mask, score = np.zeros_like(disc), 0.0
        elif i == 2:  # left half of the disc
            cols = np.nonzero(disc.any(0))[0]
            mask = disc.copy()
            mask[:, (cols.min() + cols.max()) // 2 :] = False
            score = mask.sum() / disc.sum()
        else:  # the disc itself
            mask, score = disc, 1.0
        Image.fromarray(np.where(mask[:, :, None], 255, 0).repeat(3, 2).astype(np.uint8)).save(
            folder / f"{key}.png"
        )
        expected.append(score)
    out = tmp_path / "eval"
    assert main([*_common(assets, out), "--images", str(folder), "--num-samples", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["samples"]] == keys
    assert [s["fidelity"] for s in report["samples"]] == pytest.approx(expected, abs=1e-6)
    assert report["metrics"]["fidelity"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert 0.4 < expected[2] < 0.6


def test_shards_split_over_ranks_give_the_same_samples(assets):
    cfg = EvalConfig(
        val_shards=assets["shards"],
        condition_key="outline",
        out="unused",
        resolution=SIZE,
        base=assets["base"],
        controlnet=assets["controlnet"],
        steps=1,
        batch_size=3,
    )
    source = PipelineSource(cfg, torch.device("cpu"), torch.float32)
    whole = evaluate_split(cfg, source, build_metrics(cfg), progress=False)
    parts = [
        evaluate_split(cfg, source, build_metrics(cfg), rank=r, world_size=2, progress=False)
        for r in (0, 1)
    ]
    keys = [{s["key"] for s in part} for part in parts]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == {s["key"] for s in whole} and len(whole) == 6
    # Seeds come from the sample keys, so every image (and score) is the same under any split.
    by_key = {s["key"]: s["fidelity"] for s in whole}
    assert all(s["fidelity"] == by_key[s["key"]] for part in parts for s in part)


def test_bad_input_gives_one_clear_line(assets, tmp_path, capsys):
    gen = ["--base", assets["base"], "--controlnet", assets["controlnet"], "--steps", "1"]
    common = _common(assets, tmp_path / "o")
    line = cli_error(
        capsys, main, [*common, *gen, "--fid-weights", str(tmp_path / "pt_inception.pth")]
    )
    assert "pt_inception.pth" in line and "not found" in line and "torch-fidelity" in line
    line = cli_error(
        capsys,
        main,
        [*common, *gen, "--clip-model", "ViT-B-32", "--clip-weights", str(tmp_path / "clip.bin")],
    )
    assert "clip.bin" in line and "not found" in line
    line = cli_error(capsys, main, [*common, *gen, "--clip-model", "ViT-B-32"])
    assert "needs --clip-weights" in line
    # A feature layer without the weights would silently compute no FID.
    line = cli_error(capsys, main, [*common, *gen, "--fid-feature", "64"])
    assert "--fid-feature 64 needs --fid-weights" in line and "pt_inception" in line
    line = cli_error(capsys, main, common)
    assert "--base and --controlnet" in line
    no_shards = ["--val-shards", str(tmp_path / "none-{000000..000001}.tar"), *common[2:]]
    assert "matches no shards" in cli_error(capsys, main, [*no_shards, *gen])
    bad_key = [*common[:3], "canny", *common[4:]]
    assert "no validation samples with a 'canny' condition" in cli_error(
        capsys, main, [*bad_key, *gen]
    )
    assert not (tmp_path / "o" / "report.json").exists()


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--val-shards",
        "--condition-key",
        "--fid-weights",
        "--clip-model",
        "--clip-weights",
        "--devices",
        "--wandb",
        "--images",
        "--num-samples",
        "--out",
    ):
        assert option in text


@pytest.mark.slow
def test_two_processes_split_the_shards(assets, tmp_path):
    """Two DDP processes (gloo on CPU, launched by Lightning Fabric) give the one-process report."""
    import subprocess
    import sys

    reports = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        cmd = [
            sys.executable,
            "-m",
            "cn_lightning.evaluate",
            *_common(assets, out),
            "--base",
            assets["base"],
            "--controlnet",
            assets["controlnet"],
            "--steps",
            "1",
            "--devices",
            str(devices),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[devices] = json.loads((out / "report.json").read_text())
    assert reports[2]["num_samples"] == reports[1]["num_samples"] == 6
    assert reports[2]["samples"] == reports[1]["samples"]
    assert reports[2]["metrics"] == pytest.approx(reports[1]["metrics"], abs=1e-6)
