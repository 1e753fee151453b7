"""Round trips of every data_prep tool on small generated inputs (real files, real shards)."""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
from data_helpers import make_circle_shards, save_tiny_vae, write_raw_tar, write_shards

from cn_lightning.conditions import ADE20K_PALETTE, canny
from cn_lightning.data.format import decode_image, decode_npy, expand_shard_urls, read_manifest
from cn_lightning.data.stream import SkipCounter, iter_tar
from cn_lightning.data.synthetic import build_shards, circle_sample, ensure_shards
from cn_lightning.data.transforms import center_crop_resize, image_to_tensor
from data_prep import ade20k, cache_latents, fill50k, from_images, synthetic_circles
from data_prep import inspect_shards as inspect_tool


def read_all(spec) -> list[dict]:
    """Every raw sample of the shards, in order."""
    counter = SkipCounter()
    samples = [s for url in expand_shard_urls(spec) for s in iter_tar(url, counter)]
    assert not counter.counts
    return samples


def write_image(path, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


# ------------------------------------------------------------------------ synthetic circles
def test_circles_shards_round_trip_and_manifest(tmp_path):
    out = tmp_path / "c"
    synthetic_circles.main(
        [
            "--out",
            str(out),
            "--num-samples",
            "20",
            "--size",
            "48",
            "--samples-per-shard",
            "6",
            "--workers",
            "2",
            "--seed",
            "3",
        ]
    )
    m = read_manifest(str(out))
    assert m["complete"] and m["num_samples"] == 20 and m["num_shards"] == 4
    assert m["condition_types"] == ["outline"] and m["pattern"] == "circles-{000000..000003}.tar"
    samples = read_all(str(out))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(20)]
    outline, target, prompt = circle_sample(7, 48, 3)
    s = samples[7]
    assert s["txt"].decode() == prompt and " circle with " in prompt
    assert (decode_image(s["png"]) == target).all()
    stored = decode_image(s["outline.png"])[..., 0]
    assert set(np.unique(stored)) <= {0, 255} and (stored == np.where(outline > 127, 255, 0)).all()


def test_circles_are_deterministic_and_vary(tmp_path):
    a, b = circle_sample(5, 32, 0), circle_sample(5, 32, 0)
    assert (a[1] == b[1]).all() and a[2] == b[2]
    prompts = {circle_sample(i, 32, 0)[2] for i in range(30)}
    assert len(prompts) > 20  # random colour pairs
    # Circles may cross the border: some outlines touch the image edge.
    assert any(circle_sample(i, 32, 0)[0][[0, -1]].any() for i in range(30))


def test_resume_skips_finished_shards_and_redoes_broken_ones(tmp_path):
    out = tmp_path / "c"
    args = [
        "--out",
        str(out),
        "--num-samples",
        "24",
        "--size",
        "32",
        "--samples-per-shard",
        "6",
        "--workers",
        "0",
    ]
    synthetic_circles.main(args)
    first = (out / "circles-000001.tar").read_bytes()
    # A killed run: one shard without its stats file, one stale temp file, one shard missing.
    os.remove(out / ".stats" / "circles-000002.json")
    (out / "circles-000003.tar.tmp").write_bytes(b"half")
    os.remove(out / "circles-000003.tar")
    summary, _ = build_shards(str(out), 24, 32, 0, 6, progress=False)
    assert summary.shards_built == 2 and summary.shards_skipped == 2
    assert (out / "circles-000001.tar").read_bytes() == first
    assert read_manifest(str(out))["complete"] and len(read_all(str(out))) == 24
    # Different settings in the same folder are refused with a one-line error.
    with pytest.raises(SystemExit):
        synthetic_circles.main(args[:-2] + ["--workers", "0", "--resolution", "16"])


def test_parts_split_the_work_and_the_last_part_completes_the_manifest(tmp_path, monkeypatch):
    out = str(tmp_path / "c")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # array --array=1-2 → part 0
    base = [
        "--out",
        out,
        "--num-samples",
        "20",
        "--size",
        "32",
        "--samples-per-shard",
        "5",
        "--workers",
        "0",
    ]
    synthetic_circles.main(base)
    m = read_manifest(out)
    assert not m["complete"] and [s["name"] for s in m["shards"]] == [
        "circles-000000.tar",
        "circles-000002.tar",
    ]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    synthetic_circles.main(base)
    m = read_manifest(out)
    assert m["complete"] and m["num_samples"] == 20 and m["num_shards_done"] == 4


def test_ensure_shards_builds_once_and_fast(tmp_path):
    out = str(tmp_path / "q")
    start = time.perf_counter()
    pattern = ensure_shards(out, 2000, 64, seed=0, samples_per_shard=500)
    assert time.perf_counter() - start < 20  # "a few seconds" on a shared 2-core machine
    assert pattern == os.path.join(out, "circles-{000000..000003}.tar")
    mtime = os.path.getmtime(os.path.join(out, "circles-000000.tar"))
    assert ensure_shards(out, 2000, 64, seed=0, samples_per_shard=500) == pattern
    assert os.path.getmtime(os.path.join(out, "circles-000000.tar")) == mtime
    # A different request rebuilds instead of returning stale data.
    assert ensure_shards(out, 100, 32, seed=1, samples_per_shard=50).endswith(
        "{000000..000001}.tar"
    )
    assert read_manifest(out)["num_samples"] == 100


# ------------------------------------------------------------------------ fill50k
def test_fill50k_layout_to_shards(tmp_path):
    src, out = tmp_path / "fill50k", tmp_path / "shards"
    synthetic_circles.main(
        ["--out", str(src), "--layout", "fill50k", "--num-samples", "12", "--size", "40"]
    )
    lines = (src / "prompt.json").read_text().splitlines()
    assert json.loads(lines[0]) == {
        "source": "source/0.png",
        "target": "target/0.png",
        "prompt": circle_sample(0, 40, 0)[2],
    }
    (src / "target" / "4.png").write_bytes(b"not a png")  # unreadable input
    fill50k.main(
        [
            "--src",
            str(src),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--samples-per-shard",
            "5",
            "--workers",
            "0",
        ]
    )
    m = read_manifest(str(out))
    assert m["num_samples"] == 11 and m["num_rejected"] == 1
    assert m["rejected"][0]["input"] == "target/4.png"
    assert m["rejected"][0]["reason"] == "unreadable_image"
    samples = {s["__key__"]: s for s in read_all(str(out))}
    assert "4" not in samples and samples["3"]["txt"].decode() == circle_sample(3, 40, 0)[2]
    assert decode_image(samples["3"]["png"]).shape == (32, 32, 3)
    assert decode_image(samples["3"]["outline.png"]).shape == (32, 32, 3)


def test_missing_src_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fill50k.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "Traceback" not in err


# ------------------------------------------------------------------------ from_images
def test_from_images_folder_with_captions_and_a_bad_file(tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    rng = np.random.default_rng(0)
    for i in range(7):
        image = np.zeros((48, 64, 3), np.uint8)
        image[10:30, 12 + i : 40 + i] = rng.integers(100, 256, 3)
        write_image(src / ("sub" if i % 2 else "") / f"img{i}.png", image)
        if i != 3:
            (src / ("sub" if i % 2 else "") / f"img{i}.txt").write_text(f"caption {i}\n")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    from_images.main(
        [
            "--src",
            str(src),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--condition",
            "canny",
            "--samples-per-shard",
            "3",
            "--workers",
            "2",
        ]
    )
    m = read_manifest(str(out))
    assert m["num_samples"] == 7 and m["condition_types"] == ["canny"]
    assert [r["input"] for r in m["rejected"]] == ["broken.jpg"]
    samples = {s["__key__"]: s for s in read_all(str(out))}
    s = samples["sub_img1"]
    assert s["txt"].decode() == "caption 1" and samples["img4"]["txt"].decode() == "caption 4"
    assert samples["sub_img3"]["txt"].decode() == ""  # uncaptioned: empty prompt
    image = decode_image(s["jpg"])
    assert image.shape == (32, 32, 3)
    stored = decode_image(s["canny.png"])[..., 0]
    assert (stored == canny(image)).mean() > 0.9  # extracted at the stored resolution
    assert stored.any()


def test_from_images_metadata_jsonl_and_existing_conditions(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "shards"
    rows = []
    for i in range(4):
        image = np.full((40, 40, 3), 30 * i, np.uint8)
        write_image(src / f"images/{i}.png", image)
        write_image(src / f"cond/{i}.png", 255 - image)
        rows.append(
            {"file_name": f"images/{i}.png", "text": f"t{i}", "conditioning_image": f"cond/{i}.png"}
        )
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    from_images.main(
        [
            "--src",
            str(src),
            "--out",
            str(out),
            "--resolution",
            "32",
            "--condition",
            "outline",
            "--condition-column",
            "conditioning_image",
            "--image-format",
            "png",
            "--workers",
            "0",
        ]
    )
    m = read_manifest(str(out))
    assert m["num_samples"] == 4 and m["rejected_by_reason"] == {"unreadable_input": 1}
    s = read_all(str(out))[2]
    assert s["txt"].decode() == "t2"
    assert (decode_image(s["outline.png"]) == 255 - 60).all()


def test_from_images_reads_img2dataset_shards(tmp_path):
    src, out = tmp_path / "img2dataset", tmp_path / "shards"
    samples = []
    for i in range(6):
        image = np.zeros((36, 52, 3), np.uint8)
        image[8:28, 10 + 2 * i : 30 + 2 * i] = 200
        ok, jpg = cv2.imencode(".jpg", image)
        samples.append(
            {
                "__key__": f"{i:09d}",
                "jpg": jpg.tobytes(),
                "txt": f"web {i}",
                "json": json.dumps({"url": f"http://x/{i}.jpg", "width": 52}),
            }
        )
    write_shards(src, [samples[:4], samples[4:]], prefix="00000")
    write_raw_tar(
        str(src / "00000-000002.tar"), {"000000099.jpg": b"garbage", "000000099.txt": b"bad"}
    )
    from_images.main(["--src", str(src), "--out", str(out), "--resolution", "32", "--workers", "0"])
    m = read_manifest(str(out))
    assert m["num_samples"] == 6 and m["rejected_by_reason"] == {"unreadable_image": 1}
    got = read_all(str(out))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(6)]
    meta = json.loads(got[5]["json"])
    assert meta["source_meta"]["url"] == "http://x/5.jpg" and got[5]["txt"].decode() == "web 5"


def test_from_images_unknown_extractor_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    write_image(tmp_path / "a" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit):
        from_images.main(
            ["--src", str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--condition", "heed"]
        )
    err = capsys.readouterr().err
    assert "unknown condition extractor 'heed'" in err and "registered: canny" in err


# ------------------------------------------------------------------------ ade20k
def make_ade(root) -> None:
    for split, n in (("training", 3), ("validation", 1)):
        for i in range(n):
            stem = f"ADE_{split[:5]}_{i:08d}"
            write_image(
                root / f"images/{split}/{stem}.jpg", np.full((40, 60, 3), 50 + 40 * i, np.uint8)
            )
            ann = np.zeros((40, 60), np.uint8)  # 0 = no class
            ann[:, 20:] = 1 + 2  # sky
            ann[20:, 20:] = 1 + 3  # floor
            os.makedirs(root / f"annotations/{split}", exist_ok=True)
            cv2.imwrite(str(root / f"annotations/{split}/{stem}.png"), ann)


def test_ade20k_palette_maps_and_prompts(tmp_path):
    src, out = tmp_path / "ADEChallengeData2016", tmp_path / "shards"
    make_ade(src)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        json.dumps({"file_name": "ADE_train_00000001.jpg", "text": "a bright room"}) + "\n"
    )
    ade20k.main(
        [
            "--src",
            str(src),
            "--out",
            str(out),
            "--resolution",
            "40",
            "--resize",
            "none",
            "--split",
            "all",
            "--captions",
            str(captions),
            "--workers",
            "0",
        ]
    )
    m = read_manifest(str(out))
    assert m["num_samples"] == 4 and m["condition_types"] == ["seg"]
    samples = {s["__key__"]: s for s in read_all(str(out))}
    s = samples["ADE_train_00000000"]
    seg = decode_image(s["seg.png"])
    assert seg.shape == (40, 60, 3)
    assert (seg[:, :20] == 0).all()
    assert (seg[:20, 20:] == ADE20K_PALETTE[2]).all() and (seg[20:, 20:] == ADE20K_PALETTE[3]).all()
    assert s["txt"].decode() == "a scene with sky and floor"
    assert samples["ADE_train_00000001"]["txt"].decode() == "a bright room"
    assert "ADE_valid_00000000" in samples


def test_ade20k_resize_keeps_palette_colours_exact(tmp_path):
    src, out = tmp_path / "ADE", tmp_path / "shards"
    make_ade(src)
    ade20k.main(["--src", str(src), "--out", str(out), "--resolution", "16", "--workers", "0"])
    seg = decode_image(read_all(str(out))[0]["seg.png"])
    allowed = {(0, 0, 0), tuple(ADE20K_PALETTE[2]), tuple(ADE20K_PALETTE[3])}
    assert seg.shape == (16, 16, 3) and {tuple(c) for c in seg.reshape(-1, 3)} <= allowed


# ------------------------------------------------------------------------ inspect
def test_inspect_passes_good_shards_and_flags_bad_ones(tmp_path, capsys):
    pattern = make_circle_shards(tmp_path / "c", num_samples=10, samples_per_shard=5)
    sheet = tmp_path / "sheet.png"
    with pytest.raises(SystemExit) as exc:
        inspect_tool.main([pattern, "--condition", "outline", "--sheet", str(sheet)])
    assert exc.value.code == 0 and sheet.exists()
    assert "samples: 10  good: 10  problems: 0" in capsys.readouterr().out
    write_raw_tar(
        str(tmp_path / "c" / "circles-000002.tar"),
        {"k.png": b"nope", "k.txt": b"x", "k.outline.png": b"nope"},
    )
    with pytest.raises(SystemExit) as exc:
        inspect_tool.main([str(tmp_path / "c" / "circles-{000000..000002}.tar")])
    assert exc.value.code == 1 and "undecodable image" in capsys.readouterr().out


# ------------------------------------------------------------------------ cache_latents
def test_cache_latents_adds_the_posterior_mean(tmp_path):
    from diffusers import AutoencoderKL

    pattern = make_circle_shards(tmp_path / "c", num_samples=6, size=40, samples_per_shard=4)
    model = save_tiny_vae(tmp_path / "model")
    out = tmp_path / "lat"
    cache_latents.main(
        [
            "--shards",
            pattern,
            "--model",
            model,
            "--out",
            str(out),
            "--resolution",
            "32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    m = read_manifest(str(out))
    assert m["complete"] and m["num_samples"] == 6 and m["latent"]["scaled"] is False
    samples = read_all(str(out))
    assert {"png", "outline.png", "txt", "json", "latent.npy"} <= set(samples[0])
    latent = decode_npy(samples[0]["latent.npy"])
    assert latent.dtype == np.float16 and latent.shape == (4, 16, 16)
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"))
    x = image_to_tensor(center_crop_resize(decode_image(samples[0]["png"]), 32))[None]
    expected = vae.encode(x).latent_dist.mean[0].detach().numpy()
    np.testing.assert_allclose(latent.astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    assert json.loads(samples[0]["json"])["latent"]["resolution"] == 32


def test_cache_latents_decode_threads_change_nothing_and_reruns_skip_finished(tmp_path, capsys):
    pattern = make_circle_shards(tmp_path / "c", num_samples=6, size=40, samples_per_shard=4)
    model = save_tiny_vae(tmp_path / "model")
    common = [
        "--shards",
        pattern,
        "--model",
        model,
        "--resolution",
        "32",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    cache_latents.main([*common, "--out", str(tmp_path / "a"), "--decode-threads", "0"])
    cache_latents.main([*common, "--out", str(tmp_path / "b")])  # 2 decode threads
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(names) == 2
    for name in names:  # byte for byte: the same latents, members and order
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "this run: 6 samples in 2 shards" in capsys.readouterr().out
    cache_latents.main([*common, "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "6 samples with latents in 2/2 shards" in out
    assert "this run: 0 samples in 0 shards, nothing to do, skipped 2 finished" in out
