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
    assert "| condition | metric | value | samples |" in table
    assert f"| outline | circle IoU (`circle_iou`) | {metrics['fidelity']:.4f} | 5 |" in table
    assert f"| outline | FID (`fid`) | {metrics['fid']:.4f} | 5 |" in table
    assert [(r["key"], r["samples"]) for r in report["table"]] == [
        ("circle_iou", 5),
        ("fid", 5),
        ("clip_score", 5),
    ]
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
    assert [s["circle_iou"] for s in report["samples"]] == pytest.approx(expected, abs=1e-6)
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


def _with_condition(shard: str, out: Path, name: str, extractor) -> str:
    """A copy of ``shard`` with a ``<key>.<name>.png`` condition extracted from each target."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            dst.addfile(member, io.BytesIO(data))
            key, _, ext = member.name.partition(".")
            if ext == "png":  # the target image
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                buf = io.BytesIO()
                Image.fromarray(extractor(image)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{key}.{name}.png")
                info.size = len(buf.getvalue())
                dst.addfile(info, io.BytesIO(buf.getvalue()))
    return str(out)


@pytest.fixture(scope="module")
def depth_assets(assets, tmp_path_factory) -> dict:
    """The validation shard with depth conditions from a random-weight depth extractor."""
    from cn_lightning.conditions import get_extractor
    from cn_lightning.conditions.random_weights import write_random_weights

    root = tmp_path_factory.mktemp("depth_eval")
    weights = write_random_weights("depth", root / "weights")
    extractor = get_extractor("depth", weights=weights, device="cpu")
    shard = _with_condition(
        assets["shards"], root / "shards" / "val-000000.tar", "depth", extractor
    )
    return {"shards": shard, "weights": weights, "root": root}


def test_depth_fidelity_table_with_the_extractor_weights(assets, depth_assets, tmp_path, capsys):
    """--weights: the depth of each image is extracted and compared with the condition; the
    table has ControlNet++'s RMSE (0-255) and the [0, 1] score, one row each."""
    with tarfile.open(assets["shards"]) as tar:
        targets = {
            m.name.split(".")[0]: np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
            for m in tar.getmembers()
            if m.name.count(".") == 1 and m.name.endswith(".png")
        }
    keys = sorted(targets)[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, key in enumerate(keys):  # the target itself (follows its depth), or black
        image = targets[key] if i % 2 == 0 else np.zeros_like(targets[key])
        Image.fromarray(image).save(folder / f"{key}.png")
    out = tmp_path / "eval"
    argv = [
        *("--val-shards", depth_assets["shards"], "--condition-key", "depth"),
        *("--resolution", str(SIZE), "--out", str(out), "--accelerator", "cpu"),
        *("--images", str(folder), "--num-samples", "4"),
        *("--weights", depth_assets["weights"], "--extractor-device", "cpu"),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"fidelity", "depth_rmse"}
    assert [(r["key"], r["samples"]) for r in report["table"]] == [
        ("depth_rmse", 4),
        ("fidelity", 4),
    ]
    scores = {s["key"]: s for s in report["samples"]}
    for i, key in enumerate(keys):
        if i % 2 == 0:
            assert scores[key]["depth_rmse"] < 2 and scores[key]["fidelity"] > 0.95
        else:
            assert scores[key]["depth_rmse"] > 10 and scores[key]["fidelity"] < 0.5
    rmse = np.mean([s["depth_rmse"] for s in report["samples"]])
    assert report["metrics"]["depth_rmse"] == pytest.approx(rmse, abs=1e-4)
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    for text in (printed, md):
        assert f"| depth | RMSE, 0-255 (`depth_rmse`) | {rmse:.4f} | 4 |" in text
        assert "| depth | score: 1 - RMSE / blank map's RMSE (`fidelity`) |" in text


def test_fidelity_without_the_extractor_weights_is_left_out_with_a_note(
    depth_assets, tmp_path, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    with tarfile.open(depth_assets["shards"]) as tar:
        keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    for key in keys:
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(images / f"{key}.png")
    out = tmp_path / "eval"
    argv = [
        *("--val-shards", depth_assets["shards"], "--condition-key", "depth"),
        *("--resolution", str(SIZE), "--out", str(out), "--accelerator", "cpu"),
        *("--images", str(images), "--num-samples", "2"),
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"] == {} and report["table"] == []
    assert "fidelity" not in report["samples"][0]
    assert "--weights" in report["note"] and "depth" in report["note"]
    captured = capsys.readouterr()
    assert "condition fidelity not measured" in captured.out
    warnings = [line for line in captured.err.splitlines() if "fidelity for 'depth'" in line]
    assert len(warnings) == 1 and "--weights" in warnings[0]


def test_weights_for_a_condition_without_a_model_is_refused(assets, tmp_path, capsys):
    argv = [*_common(assets, tmp_path / "o"), "--images", str(tmp_path), "--weights", "x.pth"]
    line = cli_error(capsys, main, argv)
    assert "--weights" in line and "'outline'" in line and "no model-based extractor" in line


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
        "--weights",
        "--extractor-device",
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
