"""Condition extractors: canny, outline, the registry and the ADE20K palette helpers."""

from __future__ import annotations

import numpy as np
import pytest

from cn_lightning.conditions import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    canny,
    class_names_present,
    colorize,
    decode_colors,
    get_extractor,
    is_discrete,
    list_extractors,
    outline,
    register_extractor,
)


def square_image(size: int = 64) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[16:48, 16:48] = 255
    return image


def test_canny_finds_the_square_edges_only():
    edges = canny(square_image())
    assert edges.shape == (64, 64) and edges.dtype == np.uint8
    assert set(np.unique(edges)) <= {0, 255}
    assert edges[16:48, 15:17].any() and not edges[30:34, 30:34].any()  # border yes, inside no
    assert not edges[:8].any()


def test_canny_thresholds_are_options():
    image = (np.random.default_rng(0).random((64, 64, 3)) * 40).astype(np.uint8)
    assert (
        get_extractor("canny", low_threshold=1, high_threshold=2)(image).sum()
        > get_extractor("canny")(image).sum()
    )


def test_outline_binarises_grey_levels():
    grey = np.array([[0, 100, 128, 255]], np.uint8)
    assert outline(grey).tolist() == [[0, 0, 255, 255]]
    assert outline(np.repeat(grey[..., None], 3, axis=2)).tolist() == [[0, 0, 255, 255]]


def test_registry_is_open_for_functions_and_classes():
    @register_extractor("test_invert", overwrite=True)
    def invert(image, amount: int = 255):
        return (amount - image[..., 0]).astype(np.uint8)

    @register_extractor("test_model", discrete=True, overwrite=True)
    class FakeModel:
        def __init__(self, weights: str):
            self.weights = weights

        def __call__(self, image):
            return np.full(image.shape[:2], len(self.weights), np.uint8)

    assert {"canny", "outline", "seg", "test_invert", "test_model"} <= set(list_extractors())
    assert get_extractor("test_invert")(square_image())[0, 0] == 255
    assert get_extractor("test_model", weights="abc")(square_image())[0, 0] == 3
    assert is_discrete("test_model") and is_discrete("seg") and not is_discrete("canny")
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("canny")(lambda image: image)
    with pytest.raises(KeyError, match="registered: .*canny"):
        get_extractor("no_such_condition")


def test_ade_palette_is_the_standard_one():
    assert ADE20K_PALETTE.shape == (150, 3) and len(ADE20K_CLASSES) == 150
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_CLASSES[0] == "wall"
    assert ADE20K_PALETTE[2].tolist() == [6, 230, 230] and ADE20K_CLASSES[2] == "sky"
    assert ADE20K_PALETTE[149].tolist() == [92, 0, 255] and ADE20K_CLASSES[149] == "flag"


def test_colorize_and_decode_round_trip_with_noise():
    labels = np.random.default_rng(0).integers(-1, 150, (40, 50))
    seg = colorize(labels)
    assert seg.dtype == np.uint8 and seg.shape == (40, 50, 3)
    assert (seg[labels == -1] == 0).all()
    noisy = np.clip(seg.astype(int) + np.random.default_rng(1).integers(-1, 2, seg.shape), 0, 255)
    # The palette repeats one colour, so compare in colour space, not class indices.
    assert (colorize(decode_colors(noisy.astype(np.uint8))) == seg).all()


def test_class_names_present_orders_by_area():
    labels = np.full((10, 10), 3)
    labels[:, :3] = 2
    labels[0, 0] = 8  # 1 % of the pixels: kept at the default threshold
    assert class_names_present(labels) == ["floor", "sky", "windowpane"]
    assert class_names_present(np.full((4, 4), -1)) == []


def test_seg_extractor_plugs_in_a_local_predictor():
    seg = get_extractor("seg", predictor="data_helpers:constant_seg_predictor")(square_image())
    assert seg[0, 0].tolist() == ADE20K_PALETTE[0].tolist()
    assert seg[0, -1].tolist() == ADE20K_PALETTE[2].tolist()
    with pytest.raises(ValueError, match="package.module:function"):
        get_extractor("seg", predictor="no_colon")
