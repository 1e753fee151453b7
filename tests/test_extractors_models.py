"""Model-based extractors depth, normal, seg and openpose, on random weights of the real formats.

Each runs its real loading path on a folder/file written by ``write_random_weights``, and is
checked against the reference it reimplements or batches: the transformers image processor and
model (depth, seg), the original ControlNet normal-from-depth formula, controlnet_aux's OpenPose
``Body`` and drawing.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cn_lightning.conditions import (  # noqa: E402
    ADE20K_PALETTE,
    MissingWeightsError,
    colorize,
    get_extractor,
    is_discrete,
)
from cn_lightning.conditions.depth import normal_from_depth  # noqa: E402
from cn_lightning.conditions.pose import (  # noqa: E402
    BODY_COLORS,
    decode_pose_map,
    draw_body_pose,
    people_from_body,
)
from cn_lightning.conditions.random_weights import write_random_weights  # noqa: E402
from cn_lightning.errors import ConfigError  # noqa: E402


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients, a bright disc and mild noise: uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width, yy / height, 1 - xx / width], -1) * 200
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    image[(yy - cy) ** 2 + (xx - cx) ** 2 < (height / 5) ** 2] = 240
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights per extractor, written on first use."""
    root = tmp_path_factory.mktemp("extractor_weights")
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = write_random_weights(name, root, seed=0)
        return cache[name]

    return get


def assert_batch_equals_single(extractor, images):
    batched = extractor.batch(images)
    for image, out in zip(images, batched, strict=True):
        assert np.array_equal(out, extractor(image))


# ------------------------------------------------------------------------------ common errors
@pytest.mark.parametrize("name", ["depth", "normal", "seg", "openpose"])
def test_missing_weights_is_one_line_naming_the_options(name, tmp_path):
    for weights in (None, tmp_path / "absent"):
        with pytest.raises(MissingWeightsError) as err:
            get_extractor(name, weights=weights, device="cpu")
        message = str(err.value)
        assert "\n" not in message and "--weights" in message
        assert f"extractors.{name}.weights" in message


@pytest.mark.parametrize("name", ["depth", "seg", "openpose"])
def test_a_folder_without_the_model_is_a_one_line_error(name, tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        get_extractor(name, weights=tmp_path, device="cpu")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_registry_flags():
    assert is_discrete("seg")
    assert not any(is_discrete(n) for n in ("depth", "normal", "openpose"))


# ---------------------------------------------------------------------------------- depth
def test_depth_shape_range_and_batching(weights):
    extractor = get_extractor("depth", weights=weights("depth"), device="cpu", batch_size=2)
    images = [photo_like(96, 128, 0), photo_like(96, 128, 1), photo_like(64, 64, 2)]
    out = extractor(images[0])
    assert out.shape == (96, 128) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # min-max normalised per image
    assert_batch_equals_single(extractor, images)


def test_depth_matches_the_transformers_processor_and_model(weights):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    path = weights("depth")
    extractor = get_extractor("depth", weights=path, device="cpu")
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True).eval()
    images = np.stack([photo_like(96, 128, 3), photo_like(96, 128, 4)])

    pixels = processor(images=list(images), return_tensors="pt").pixel_values
    ours = extractor.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert ours.shape == pixels.shape == (2, 3, 392, 518)  # 518 px, multiple of 14, aspect kept
    torch.testing.assert_close(ours, pixels, rtol=0, atol=1e-5)

    with torch.no_grad():
        reference = processor.post_process_depth_estimation(
            model(pixel_values=pixels), target_sizes=[(96, 128)] * 2
        )
        depth = extractor.predict_depth(images)
    for i in range(2):
        ref = reference[i]["predicted_depth"]
        assert ref.std() > 0  # the random network's depth is not constant
        torch.testing.assert_close(depth[i], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        ref_u8 = ((ref - ref.min()) / (ref.max() - ref.min()) * 255).to(torch.uint8).numpy()
        assert np.abs(extractor(images[i]).astype(int) - ref_u8).max() <= 1


def test_depth_runs_a_dpt_midas_style_folder(tmp_path):
    """The DPT/MiDaS family (Intel/dpt-hybrid-midas's processor: square 384 px, bilinear,
    mean = std = 0.5) through the same code, here with a tiny plain-ViT DPT."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForDepthEstimation,
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
    )

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=384,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        initializer_range=0.2,
    )
    DPTForDepthEstimation(config).save_pretrained(tmp_path)
    DPTImageProcessor(
        size=384, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(tmp_path)
    extractor = get_extractor("depth", weights=tmp_path, device="cpu")
    image = photo_like(48, 64, 13)
    processor = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        inputs = processor(images=image, return_tensors="pt")
        assert inputs.pixel_values.shape == (1, 3, 384, 384)
        ref = processor.post_process_depth_estimation(model(**inputs), target_sizes=[(48, 64)])
        ref = ref[0]["predicted_depth"]
        ours = extractor.predict_depth(image[None])[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert extractor(image).shape == (48, 64)


# --------------------------------------------------------------------------------- normal
def test_normal_of_a_flat_plane_faces_the_camera():
    for depth in (np.zeros((8, 10)), np.full((8, 10), 3.0)):
        normal = normal_from_depth(depth)
        assert normal.shape == (8, 10, 3) and normal.dtype == np.uint8
        assert (normal == np.array([127, 127, 255], np.uint8)).all()


def test_normal_of_a_horizontal_ramp_and_background():
    a, slope, width = 2 * math.pi, 0.5, 20
    depth = np.tile(np.arange(width, dtype=np.float32) * slope, (6, 1))
    normal = normal_from_depth(depth, a=a, bg_th=0.1)
    gx = 8 * slope  # the 3x3 Sobel of a unit-step ramp is 8 per step
    norm = math.sqrt(gx**2 + a**2)
    x_val = np.uint8(np.float32(gx / norm) * 127.5 + 127.5)
    z_val = np.uint8(np.float32(a / norm) * 127.5 + 127.5)
    # Normalised depth col / 19: columns 0 and 1 are below 0.1 (background, flat); the last
    # column has a zero gradient (OpenCV's reflected border).
    assert (normal[:, :2] == [127, 127, 255]).all()
    assert (normal[:, 2:-1, 0] == x_val).all() and (normal[:, 2:-1, 2] == z_val).all()
    assert (normal[:, :, 1] == 127).all()
    assert (normal[:, -1] == [127, 127, 255]).all()
    # bg_th = 0: every column with a gradient is foreground.
    assert (normal_from_depth(depth, a=a, bg_th=0.0)[:, 1:-1, 0] == x_val).all()


def test_normal_extractor_applies_normal_from_depth(weights):
    extractor = get_extractor(
        "normal", weights=weights("depth"), device="cpu", a=3.0, bg_th=0.2, batch_size=2
    )
    images = [photo_like(64, 64, 5), photo_like(64, 64, 6), photo_like(48, 80, 7)]
    out = extractor(images[0])
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    with torch.no_grad():
        depth = extractor.predict_depth(images[0][None])[0].numpy()
    assert np.array_equal(out, normal_from_depth(depth, a=3.0, bg_th=0.2))
    assert_batch_equals_single(extractor, images)


def test_normal_writes_the_depth_kind_of_folder(tmp_path):
    path = write_random_weights("normal", tmp_path)
    names = set(os.listdir(path))
    assert {"config.json", "preprocessor_config.json"} <= names
    assert json.loads(open(os.path.join(path, "config.json")).read())["model_type"] == (
        "depth_anything"
    )


# ------------------------------------------------------------------------------------ seg
def test_seg_maps_argmax_labels_to_the_palette_like_transformers(weights):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    path = weights("seg")
    extractor = get_extractor("seg", weights=path, device="cpu", batch_size=2)
    images = [photo_like(96, 128, 8), photo_like(96, 128, 9), photo_like(64, 64, 10)]
    out = extractor(images[0])
    assert out.shape == (96, 128, 3) and out.dtype == np.uint8
    labels = extractor.predict_labels(images[0][None])[0]
    assert np.array_equal(out, colorize(labels))
    assert len(np.unique(labels)) > 5  # the random model predicts varied classes
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in ADE20K_PALETTE}

    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        inputs = processor(images=images[0], return_tensors="pt")
        reference = processor.post_process_semantic_segmentation(
            model(**inputs), target_sizes=[(96, 128)]
        )[0].numpy()
    assert (reference == labels).mean() > 0.999
    assert_batch_equals_single(extractor, images)


def test_seg_needs_an_ade20k_model(tmp_path):
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    config = SegformerConfig(
        depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 8, 8], decoder_hidden_size=8, num_labels=19
    )
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path)
    SegformerImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        get_extractor("seg", weights=tmp_path, device="cpu")
    assert "\n" not in str(err.value) and "19" in str(err.value) and "150" in str(err.value)


def test_seg_takes_weights_or_a_predictor_not_both(weights):
    predictor = "data_helpers:constant_seg_predictor"
    with pytest.raises(ConfigError, match="not both"):
        get_extractor("seg", weights=weights("seg"), predictor=predictor)
    seg = get_extractor("seg", predictor=predictor)
    images = [np.zeros((8, 10, 3), np.uint8), np.zeros((6, 4, 3), np.uint8)]
    assert seg.batch(images)[1][0, -1].tolist() == ADE20K_PALETTE[2].tolist()


# ------------------------------------------------------------------------------- openpose
# A standing person (x, y) in pixels around its centre, COCO-18 order.
TEMPLATE = np.array(
    [
        [0, -30], [0, -20], [-10, -20], [-14, -6], [-16, 8], [10, -20], [14, -6], [16, 8],
        [-6, 5], [-7, 20], [-8, 34], [6, 5], [7, 20], [8, 34], [-4, -34], [4, -34],
        [-8, -31], [8, -31],
    ],
    dtype=np.float64,
)  # fmt: skip


def aux_drawing(people, height, width):
    """controlnet_aux's own drawing of ``people`` (body only), as its detector does."""
    from controlnet_aux.open_pose import PoseResult, draw_poses
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    poses = []
    for person in people:
        keypoints = [
            None if np.isnan(p).any() else Keypoint(x=p[0] / float(width), y=p[1] / float(height))
            for p in person
        ]
        poses.append(PoseResult(BodyResult(keypoints, 0.0, 0), None, None, None))
    return draw_poses(poses, height, width, draw_body=True, draw_hand=False, draw_face=False)


def test_draw_body_pose_is_controlnet_aux_drawing():
    rng = np.random.default_rng(0)
    people = [TEMPLATE + [40.3, 45.7], TEMPLATE * 0.8 + [100, 50]]
    people[1][[4, 9, 16]] = np.nan  # missing keypoints
    people.append(rng.uniform(0, 127, (18, 2)))  # anything, even crossing limbs
    for subset in (people[:1], people):
        ours = draw_body_pose(subset, 96, 128)
        assert ours.dtype == np.uint8 and ours.shape == (96, 128, 3)
        assert np.array_equal(ours, aux_drawing(subset, 96, 128))
    # integer peaks, as the detector finds them (x / W * W must truncate the same way)
    integer = [np.floor(TEMPLATE * 1.3 + [61, 50])]
    assert np.array_equal(draw_body_pose(integer, 100, 123), aux_drawing(integer, 100, 123))


def test_draw_then_decode_gives_the_keypoints_back():
    assert decode_pose_map(np.zeros((40, 50, 3), np.uint8)) == []
    one = TEMPLATE + [50.4, 45.2]
    two_a, two_b = TEMPLATE + [35, 48], TEMPLATE * 0.9 + [95.6, 50]
    two_b[[3, 4, 16]] = np.nan
    for people in ([one], [two_a, two_b]):
        decoded = decode_pose_map(draw_body_pose(people, 96, 128))
        assert len(decoded) == len(people)
        for want, got in zip(people, decoded, strict=True):
            assert np.array_equal(np.isnan(want), np.isnan(got))
            present = ~np.isnan(want[:, 0])
            assert np.abs(got[present] - want[present]).max() <= 1.0
    # A disc of each colour is found even when nothing else is drawn.
    single = np.full((18, 2), np.nan)
    single[7] = [20, 20]
    decoded = decode_pose_map(draw_body_pose([single], 40, 40))
    assert len(decoded) == 1 and decoded[0][7].tolist() == [20.0, 20.0]
    assert len(BODY_COLORS) == len({tuple(c) for c in BODY_COLORS}) == 18


@pytest.fixture(scope="module")
def openpose(weights):
    return get_extractor("openpose", weights=weights("openpose"), device="cpu", batch_size=4)


def test_openpose_random_network_matches_controlnet_aux_body(openpose, weights):
    from controlnet_aux.open_pose.body import Body

    images = np.stack([photo_like(64, 80, 11), photo_like(64, 80, 12)])
    detections = openpose.detect(images)  # one batched network pass
    body = Body(weights("openpose"))  # controlnet_aux's own loading of the same file
    for image, (candidate, subset) in zip(images, detections, strict=True):
        ref_candidate, ref_subset = body(np.ascontiguousarray(image[:, :, ::-1]))
        np.testing.assert_allclose(np.asarray(candidate), np.asarray(ref_candidate), atol=1e-5)
        assert np.array_equal(np.asarray(subset), np.asarray(ref_subset))
    # The random network finds peaks but assembles nobody: black maps.
    assert all(len(c) > 0 and len(s) == 0 for c, s in detections)
    assert not any(draw_body_pose(people_from_body(c, s), 64, 80).any() for c, s in detections)


class SyntheticBodyNet(torch.nn.Module):
    """A stand-in body network whose heatmaps and PAFs show TEMPLATE around the brightest
    spot of each input, so that the detection and assembly find a person."""

    LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
             [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]  # fmt: skip  # noqa: E501
    PAF = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22],
           [23, 24], [25, 26], [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52],
           [55, 56], [37, 38], [45, 46]]  # fmt: skip

    def __init__(self, image_height: int):
        super().__init__()
        self.to_grid = (184 / image_height) / 8  # image pixels → output cells
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b, _, h, w = x.shape
        gh, gw = h // 8, w // 8
        paf, heat = np.zeros((b, 38, gh, gw), np.float32), np.zeros((b, 19, gh, gw), np.float32)
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
        for i in range(b):
            bright = x[i].mean(0).numpy() > 0.3
            cy, cx = (np.argwhere(bright).mean(0) + 0.5) / 8
            points = TEMPLATE * self.to_grid + [cx, cy]
            for k, (px, py) in enumerate(points):
                heat[i, k] = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 0.5)
            for (ka, kb), (cx_, cy_) in zip(self.LIMBS, self.PAF, strict=True):
                pa, pb = points[ka - 1], points[kb - 1]
                d = pb - pa
                length = np.hypot(*d)
                t = np.clip(((xx - pa[0]) * d[0] + (yy - pa[1]) * d[1]) / length**2, 0, 1)
                near = np.hypot(xx - pa[0] - t * d[0], yy - pa[1] - t * d[1]) <= 1.5
                paf[i, cx_ - 19][near], paf[i, cy_ - 19][near] = d / length
        return torch.from_numpy(paf), torch.from_numpy(heat)


def test_openpose_batch_finds_people_as_controlnet_aux_does(openpose):
    from controlnet_aux.open_pose.body import Body

    height, width = 96, 128
    images = []
    for cx in (40, 88):
        image = np.zeros((height, width, 3), np.uint8)
        image[44:52, cx - 4 : cx + 4] = 255
        images.append(image)
    extractor = copy.copy(openpose)
    extractor.model = SyntheticBodyNet(height)
    maps = extractor.batch(images)
    body = Body.__new__(Body)
    body.model = extractor.model
    for image, got in zip(images, maps, strict=True):
        candidate, subset = body(np.ascontiguousarray(image[:, :, ::-1]))
        people = people_from_body(candidate, subset)
        assert len(people) == 1 and not np.isnan(people[0]).any()
        assert np.array_equal(got, aux_drawing(people, height, width))
        decoded = decode_pose_map(got)
        assert len(decoded) == 1 and np.abs(decoded[0] - people[0]).max() <= 1.0
        assert np.array_equal(got, extractor(image))
