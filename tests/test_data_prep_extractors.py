"""data_prep.from_images with every condition extractor: a folder of photos → shards.

Model-based extractors run with random weights in their real on-disk format
(cn_lightning.conditions.random_weights), loaded through the same --weights path as published
weights; the shards are read back and checked sample by sample.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cn_lightning.conditions import get_spec, list_extractors, needs_weights
from cn_lightning.conditions.random_weights import write_random_weights
from cn_lightning.data.format import decode_image, read_manifest
from cn_lightning.data.shard_writer import RejectedInput, SampleMaker
from cn_lightning.data.stream import SkipCounter, iter_tar
from cn_lightning.data.synthetic import scene_image
from data_prep import from_images

PAPER_CONDITIONS = (
    "canny",
    "hed",
    "softedge",
    "scribble",
    "lineart",
    "mlsd",
    "depth",
    "normal",
    "openpose",
    "seg",
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five photo-like images of two sizes with captions, and one broken file."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(5):
        h, w = (80, 96) if i % 2 else (96, 80)
        Image.fromarray(scene_image(i, h, w)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"scene {i}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return {n: write_random_weights(n, folder) for n in PAPER_CONDITIONS if needs_weights(n)}


def _read(out) -> list[dict]:
    counter = SkipCounter()
    samples = [s for shard in sorted(out.glob("*.tar")) for s in iter_tar(str(shard), counter)]
    assert not counter.counts
    return samples


def test_every_paper_condition_is_registered():
    missing = [n for n in PAPER_CONDITIONS if n not in list_extractors()]
    assert not missing
    assert get_spec("seg").discrete and not get_spec("depth").discrete


@pytest.mark.parametrize("name", PAPER_CONDITIONS)
def test_from_images_builds_shards_for_condition(name, photos, weights, tmp_path, capsys):
    out = tmp_path / name
    argv = ["--src", str(photos), "--out", str(out), "--condition", name, "--resolution", "64"]
    argv += ["--workers", "0", "--batch-size", "3", "--device", "cpu"]
    if name in weights:
        argv += ["--weights", weights[name]]
    from_images.main(argv)
    assert "samples/s per worker" in capsys.readouterr().out
    manifest = read_manifest(str(out))
    assert manifest["num_samples"] == 5 and manifest["condition_types"] == [name]
    assert [r["reason"] for r in manifest["rejected"]] == ["unreadable_image"]
    samples = _read(out)
    assert len(samples) == 5
    for sample in samples:
        image = decode_image(sample["jpg"])
        condition = decode_image(sample[f"{name}.png"])
        assert image.shape == (64, 64, 3)
        assert condition.shape[:2] == (64, 64) and condition.dtype == np.uint8


def test_batched_extraction_equals_one_by_one(photos, weights, tmp_path):
    """--batch-size changes how many images share a forward pass, never the shards."""
    outs = []
    for batch in (1, 4):
        out = tmp_path / f"b{batch}"
        argv = ["--src", str(photos), "--out", str(out), "--condition", "hed"]
        argv += ["--weights", weights["hed"], "--resolution", "64", "--workers", "0"]
        from_images.main(argv + ["--batch-size", str(batch), "--device", "cpu"])
        outs.append([decode_image(s["hed.png"]) for s in _read(out)])
    assert len(outs[0]) == 5
    for a, b in zip(*outs, strict=True):
        # Convolutions of a batch may sum in another order: a grey level at most.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_missing_or_wrong_weights_is_one_line(photos, tmp_path, weights):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "data_prep.from_images", "--src", str(photos)]
    base += ["--out", str(tmp_path / "o"), "--workers", "0"]
    cases = {
        "depth": [],
        "hed": ["--weights", str(tmp_path / "nope.pth")],
        "openpose": ["--weights", weights["hed"]],  # another model's file
        "canny": ["--weights", weights["hed"]],  # canny has no model
    }
    for name, extra in cases.items():
        done = subprocess.run(
            base + ["--condition", name, *extra], capture_output=True, text=True, env=env
        )
        assert done.returncode == 2, (name, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (name, done.stderr)
        if name in ("depth", "hed"):
            assert "--weights" in lines[0] and f"extractors.{name}.weights" in lines[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.tar"))


class _Failing(SampleMaker):
    """Rejects item 1 by a RejectedInput and item 3 by a crash, inside batches of 2."""

    batch_size = 2

    def make(self, item):
        if item == 1:
            raise RejectedInput("bad_item", "one")
        if item == 3:
            raise RuntimeError("boom")
        return {"__key__": f"k{item}", "txt": str(item)}


def test_batched_maker_counts_rejects_per_item(tmp_path):
    from cn_lightning.data.shard_writer import PrepConfig, run_shards

    cfg = PrepConfig(
        out=str(tmp_path),
        prefix="data",
        tool="test",
        resolution=None,
        resize="none",
        image_format="jpg",
        quality=95,
        samples_per_shard=10,
        workers=0,
        progress=False,
    )
    summary = run_shards(list(range(5)), _Failing(), cfg)
    assert summary.samples_written == 3 and summary.rejected == 2
    reasons = sorted(r["reason"] for r in summary.manifest["rejected"])
    assert reasons == ["RuntimeError", "bad_item"]
