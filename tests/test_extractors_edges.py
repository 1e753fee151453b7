"""Model-based edge extractors (hed, softedge, scribble, lineart, mlsd) on random weights.

Each is checked against ``controlnet_aux``'s own detector class run on the very same network,
at an image size where the detector's internal resizing is the identity (sides multiples of 64,
``detect_resolution = image_resolution`` = the shorter side). The weight-free parts (NMS,
scribble post-processing, M-LSD decoding and line drawing) are checked exactly on hand-made
inputs.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch

from cn_lightning.conditions import MissingWeightsError, get_extractor
from cn_lightning.conditions.base import seeded
from cn_lightning.conditions.edges import (
    draw_lines,
    mlsd_segments,
    nms,
    safe_step,
    scribble_from_edges,
)
from cn_lightning.conditions.random_weights import write_random_weights
from cn_lightning.errors import ConfigError

H, W = 64, 128  # multiples of 64: controlnet_aux's resize_image is then the identity
NAMES = ["hed", "softedge", "scribble", "lineart", "mlsd"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These networks run on tiny images: with several threads on a busy machine the thread
    hand-offs cost more than the convolutions (PiDiNet: 3 s instead of 0.1 s per image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def aux():
    with warnings.catch_warnings():  # its import warns about optional packages
        warnings.simplefilter("ignore")
        return pytest.importorskip("controlnet_aux")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, aux) -> dict[str, str]:
    out = tmp_path_factory.mktemp("extractor_weights")
    return {name: write_random_weights(name, out) for name in NAMES}


def blocky(seed: int, height: int = H, width: int = W) -> np.ndarray:
    """Random 8x8-pixel colour blocks: plenty of edges and lines."""
    cells = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3))
    return np.kron(cells, np.ones((8, 8, 1))).astype(np.uint8)


IMAGES = [blocky(seed) for seed in range(3)]


def reference(detector, image, **kwargs) -> np.ndarray:
    """controlnet_aux's map at the image's own size, first channel (its maps are HWC3)."""
    side = min(image.shape[:2])
    out = detector(image, detect_resolution=side, image_resolution=side, output_type="np", **kwargs)
    assert out.shape == (*image.shape[:2], 3)
    return out[:, :, 0]


def check_batch_equals_single(extractor) -> list[np.ndarray]:
    batched = extractor.batch(IMAGES)  # batch_size 2: a pass of 2, then one of 1
    for image, m in zip(IMAGES, batched, strict=True):
        assert m.shape == (H, W) and m.dtype == np.uint8
        np.testing.assert_array_equal(m, extractor(image))
    return batched


# ----------------------------------------------------------------------------- each extractor
def test_hed_matches_controlnet_aux(aux, weights):
    ex = get_extractor("hed", weights=weights["hed"], device="cpu", batch_size=2)
    maps = check_batch_equals_single(ex)
    detector = aux.HEDdetector(ex.model)
    for image, m in zip(IMAGES, maps, strict=True):
        assert len(np.unique(m)) > 50  # soft edges, not a constant: the comparison means something
        diff = np.abs(m.astype(int) - reference(detector, image))
        # Side outputs are resized on the device (torch bilinear) where controlnet_aux uses
        # cv2.INTER_LINEAR: the same formula, float rounding may move a pixel by one level.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_hed_safe_option(aux, weights):
    ex = get_extractor("hed", weights=weights["hed"], device="cpu", safe=True)
    detector = aux.HEDdetector(ex.model)
    for image in IMAGES[:2]:
        m = ex(image)
        assert set(np.unique(m)) <= {0, 127, 255}
        assert (m != reference(detector, image, safe=True)).mean() < 0.005


def test_softedge_matches_controlnet_aux(aux, weights):
    # The random file's classifier is spread (an untrained PiDiNet is 0.5 everywhere).
    ex = get_extractor("softedge", weights=weights["softedge"], device="cpu", batch_size=2)
    maps = check_batch_equals_single(ex)
    detector = aux.PidiNetDetector(ex.model)
    for image, m in zip(IMAGES, maps, strict=True):
        assert len(np.unique(m)) > 50
        np.testing.assert_array_equal(m, reference(detector, image))
    safe = get_extractor("softedge", weights=weights["softedge"], device="cpu", safe=True)
    safe.model.load_state_dict(ex.model.state_dict())
    np.testing.assert_array_equal(safe(IMAGES[0]), reference(detector, IMAGES[0], safe=True))


def test_random_files_have_the_published_names_layouts_and_dtypes(weights):
    hed = torch.load(weights["hed"], map_location="cpu", weights_only=True)
    assert weights["hed"].endswith("ControlNetHED.pth") and "block5.projection.bias" in hed
    assert all(v.dtype == torch.float16 for v in hed.values())  # published in half precision
    for name, filename in [("lineart", "sk_model.pth"), ("mlsd", "mlsd_large_512_fp32.pth")]:
        state = torch.load(weights[name], map_location="cpu", weights_only=True)
        assert weights[name].endswith(filename)
        assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_softedge_file_is_the_published_checkpoint_layout(weights):
    checkpoint = torch.load(weights["softedge"], map_location="cpu", weights_only=True)
    assert weights["softedge"].endswith("table5_pidinet.pth")
    assert set(checkpoint) == {"epoch", "state_dict"}
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])


def test_scribble_matches_controlnet_aux(aux, weights):
    ex = get_extractor("scribble", weights=weights["scribble"], device="cpu", batch_size=2)
    maps = check_batch_equals_single(ex)
    detector = aux.HEDdetector(ex.model)
    for image, m in zip(IMAGES, maps, strict=True):
        assert set(np.unique(m)) == {0, 255}
        assert (m != reference(detector, image, scribble=True)).mean() < 0.005
        # The post-processing alone is exact on controlnet_aux's own edges.
        edges = reference(detector, image)
        np.testing.assert_array_equal(
            scribble_from_edges(edges), reference(detector, image, scribble=True)
        )


def test_lineart_matches_controlnet_aux_fine_and_coarse(aux, weights):
    ex = get_extractor("lineart", weights=weights["lineart"], device="cpu", batch_size=2)
    maps = check_batch_equals_single(ex)
    # A folder holding both files picks sk_model2.pth for coarse=True.
    folder = weights["lineart"].rsplit("/", 1)[0]
    coarse = get_extractor("lineart", weights=folder, device="cpu", coarse=True)
    detector = aux.LineartDetector(ex.model, coarse.model)
    for image, m in zip(IMAGES, maps, strict=True):
        assert len(np.unique(m)) > 50
        np.testing.assert_array_equal(m, reference(detector, image))
    c = coarse(IMAGES[0])
    np.testing.assert_array_equal(c, reference(detector, IMAGES[0], coarse=True))
    assert not np.array_equal(c, maps[0])


def test_lineart_odd_sizes_are_padded_not_resized(weights):
    ex = get_extractor("lineart", weights=weights["lineart"], device="cpu")
    image = blocky(5, 72, 88)[:67, :85]
    m = ex(image)
    assert m.shape == (67, 85) and m.dtype == np.uint8


def sharpen_mlsd(model: torch.nn.Module) -> None:
    """Random M-LSDs score every centre ~0.5 with sub-pixel segments: spread the centre logits
    and lengthen the segments, so that thresholds select some lines but not all."""
    head = model.block23.conv3  # channels 7 (centre) and 8..11 (end displacements) are used
    with torch.no_grad():
        head.weight[7].mul_(300)
        head.bias[7].zero_()
        head.weight[8:12].mul_(30)
        head.bias[8:12].mul_(30)


def test_mlsd_matches_controlnet_aux_and_thresholds(aux, weights):
    ex = get_extractor("mlsd", weights=weights["mlsd"], device="cpu", batch_size=2)
    sharpen_mlsd(ex.model)
    maps = check_batch_equals_single(ex)
    detector = aux.MLSDdetector(ex.model)
    for image, m in zip(IMAGES, maps, strict=True):
        assert set(np.unique(m)) == {0, 255}
        np.testing.assert_array_equal(m, reference(detector, image))
    strict = get_extractor("mlsd", weights=weights["mlsd"], device="cpu", thr_v=0.3)
    sharpen_mlsd(strict.model)
    s = strict(IMAGES[0])
    np.testing.assert_array_equal(s, reference(detector, IMAGES[0], thr_v=0.3))
    assert 0 < (s > 0).sum() < (maps[0] > 0).sum() and not (s & ~maps[0]).any()  # fewer lines
    long_only = get_extractor("mlsd", weights=weights["mlsd"], device="cpu", thr_d=1000.0)
    assert not long_only(IMAGES[0]).any()


def test_mlsd_other_sizes_run(weights):
    ex = get_extractor("mlsd", weights=weights["mlsd"], device="cpu")
    m = ex(blocky(4, 80, 104)[:70, :100])  # not multiples of 32: resized for the network
    assert m.shape == (70, 100) and set(np.unique(m)) <= {0, 255}


def test_every_extractor_is_registered_and_maps_uint8(weights):
    image = blocky(7, 64, 64)
    for name in NAMES:
        m = get_extractor(name, weights=weights[name], device="cpu")(image)
        assert m.shape == (64, 64) and m.dtype == np.uint8, name


# ---------------------------------------------------------------------- weight-free, exactly
def test_nms_matches_the_original_annotator(aux):
    from controlnet_aux.util import nms as original_nms

    noise = (np.random.default_rng(0).random((50, 70)) * 255).astype(np.uint8)
    edges = (cv2.GaussianBlur(noise, (0, 0), 2).astype(np.int32) * 3).clip(0, 255)
    edges = edges.astype(np.uint8)
    for t, s in [(127, 3.0), (60, 1.0)]:
        np.testing.assert_array_equal(nms(edges, t, s), original_nms(edges, t, s))


def test_scribble_of_empty_and_of_faint_dots_is_empty():
    empty = np.zeros((40, 50), np.uint8)
    assert not nms(empty, 127, 3.0).any() and not scribble_from_edges(empty).any()
    dots = empty.copy()
    dots[10, 10] = dots[30, 40] = 255  # a lone pixel blurs (sigma 3) to ~4.5 < 127: gone
    assert not scribble_from_edges(dots).any()


def test_scribble_of_a_straight_stroke_is_a_band_six_pixels_wider_each_side():
    edges = np.zeros((64, 64), np.uint8)
    edges[28:37] = 255  # a 9 px horizontal stroke across the image
    # The original NMS keeps a pixel that is a maximum along ANY of its 4 directions, so a
    # stroke constant along itself is kept wherever its blur exceeds 127: rows 28..36 here.
    thin = nms(edges, 127, 3.0)
    assert (thin == thin[:, :1]).all() and np.flatnonzero(thin[:, 0]).tolist() == list(
        range(28, 37)
    )
    # Blur sigma 3 then > 4 widens it by 6 px each side: rows 22..42, 21 px.
    band = scribble_from_edges(edges)
    assert (band == band[:, :1]).all()
    assert np.flatnonzero(band[:, 0]).tolist() == list(range(22, 43))


def test_scribble_of_a_slanted_stroke_thins_it_then_widens_it():
    edges = np.zeros((96, 96), np.uint8)
    cv2.line(edges, (10, 20), (85, 60), 255, 7)  # 7 px thick, slope 40/75
    thin, band = nms(edges, 127, 3.0), scribble_from_edges(edges)
    for x in range(25, 71):
        centre = 20 + (x - 10) * 40 / 75
        rows = np.flatnonzero(thin[:, x])
        assert 1 <= len(rows) <= 2 and np.abs(rows - centre).max() <= 1.5  # a 1-2 px ridge
        rows = np.flatnonzero(band[:, x])
        # One contiguous stroke 13 px across the line (14-15 px down a column at this slope).
        assert len(rows) in (14, 15) and rows[-1] - rows[0] == len(rows) - 1
        assert abs(rows.mean() - centre) <= 1.0
    assert set(np.unique(band)) == {0, 255}


def test_safe_step_levels():
    x = np.array([0.0, 0.3, 0.34, 0.66, 0.67, 1.0])
    assert safe_step(x).tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 1.5]


def test_draw_lines_truncates_and_clips():
    lines = np.array(
        [
            [2.7, 3.2, 10.9, 3.99],  # truncated to (2, 3)-(10, 3)
            [-10.0, 6.5, 100.0, 6.0],  # clipped to the image: all of row 6
            [np.nan, 0, 1, 1],  # skipped
        ]
    )
    m = draw_lines(lines, 8, 16)
    expected = np.zeros((8, 16), np.uint8)
    expected[3, 2:11] = 255
    expected[6, :] = 255
    np.testing.assert_array_equal(m, expected)
    diagonal = draw_lines(np.array([[0.0, 0.0, 4.0, 4.0]]), 5, 5)
    np.testing.assert_array_equal(diagonal, np.eye(5, dtype=np.uint8) * 255)
    assert not draw_lines(np.zeros((0, 4)), 4, 4).any()


def test_mlsd_segments_thresholds_and_offsets():
    ys, xs = np.array([1, 2, 3]), np.array([3, 4, 5])
    scores = np.array([0.5, 0.05, 0.9], np.float32)
    displacements = np.array(
        [[-1.0, 0.0, 2.0, 0.5], [-3, 0, 3, 0], [0.01, 0.0, -0.02, 0.0]], np.float32
    )
    # The second scores too low, the third is too short (0.03 grid px).
    segments = mlsd_segments(ys, xs, scores, displacements, thr_v=0.1, thr_d=0.1)
    assert segments.dtype == np.float64
    np.testing.assert_allclose(segments, [[2.0, 1.0, 5.0, 1.5]])
    assert mlsd_segments(ys, xs, scores, displacements, 0.95, 0.1).shape == (0, 4)


# ------------------------------------------------------------------------------ weights
def test_missing_weights_is_one_line_naming_both_options(tmp_path):
    for kwargs in ({}, {"weights": tmp_path / "nowhere" / "ControlNetHED.pth"}):
        with pytest.raises(MissingWeightsError) as info:
            get_extractor("hed", **kwargs)
        message = str(info.value)
        assert "\n" not in message
        assert "--weights" in message and "extractors.hed.weights" in message
        assert "ControlNetHED.pth" in message


def test_a_folder_without_the_file_or_a_wrong_file_is_a_one_line_error(tmp_path, weights):
    with pytest.raises(MissingWeightsError, match="no sk_model.pth in folder") as info:
        get_extractor("lineart", weights=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(MissingWeightsError, match="does not hold the expected") as info:
        get_extractor("mlsd", weights=weights["hed"])  # a HED file given to M-LSD
    assert "\n" not in str(info.value)
    with pytest.raises(MissingWeightsError, match="not a PiDiNet checkpoint"):
        get_extractor("softedge", weights=weights["hed"])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(MissingWeightsError, match="cannot read weights") as info:
        get_extractor("hed", weights=junk)
    assert "\n" not in str(info.value)


def test_unknown_options_are_refused(weights):
    with pytest.raises(ConfigError, match="unknown options"):
        get_extractor("mlsd", weights=weights["mlsd"], device="cpu", thr_x=1)


def test_random_weights_are_reproducible(tmp_path, aux):
    a = torch.load(write_random_weights("hed", tmp_path / "a", seed=3), weights_only=True)
    b = torch.load(write_random_weights("hed", tmp_path / "b", seed=3), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with seeded(0):  # writing them leaves the caller's random stream alone
        expected = torch.rand(2)
        torch.manual_seed(0)
        torch.rand(1)
        write_random_weights("mlsd", tmp_path / "c", seed=3)
        assert torch.equal(torch.rand(1), expected[1:])


def test_registering_does_not_import_controlnet_aux():
    code = (
        "import sys, cn_lightning.conditions as c; "
        "assert {'hed','softedge','scribble','lineart','mlsd'} <= set(c.list_extractors()); "
        "assert 'controlnet_aux' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
