"""Fidelity means something for every condition: a degenerate sample (black, uniform noise, an
unrelated photo-like scene) scores clearly below a sample that follows the condition.

The cases are those of ``benchmarks/fidelity_sanity.py`` (which prints them as a table), at a
small size. Model-based extractors run with random weights in their real on-disk format; the
matching sample is the image the condition was extracted from (re-extraction is deterministic).
``openpose``: a random-weight body network finds no one in a synthetic scene, so its metric is
checked on pose maps drawn from hand-made keypoints (matching = the same keypoints moved by at
most 2 px; degenerate = black and another pose).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from cn_lightning.conditions import get_spec, list_extractors
from cn_lightning.metrics.fidelity import fidelity_metric_for

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_sanity.py"
SIZE = 128


def _load_benchmark():
    sys.path.insert(0, str(BENCHMARK.parent))  # the stand-in segmenter's module path
    spec = importlib.util.spec_from_file_location("fidelity_sanity", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity_sanity"] = module
    spec.loader.exec_module(module)
    return module


sanity = _load_benchmark()

EXPECTED_METRIC = {
    "canny": "edge_f1",
    "mlsd": "edge_f1",
    "scribble": "edge_f1",
    "hed": "ssim",
    "softedge": "ssim",
    "lineart": "ssim",
    "depth": "depth_rmse",
    "normal": "normal_angle",
    "openpose": "pose_oks",
    "seg": "seg_miou",
    "outline": "circle_iou",
    "swatch": "swatch_match",
    "xline": "line_match",
    "yline": "line_match",
}


def test_every_built_in_condition_is_covered_with_its_literature_metric():
    assert set(sanity.CONDITIONS) == set(EXPECTED_METRIC)
    # Built-ins only: other tests register plug-ins of their own in the same process.
    built_in = {
        n for n in list_extractors() if get_spec(n).factory.__module__.startswith("cn_lightning.")
    }
    assert built_in <= set(sanity.CONDITIONS), "a condition without a sanity case"
    for name, metric in EXPECTED_METRIC.items():
        assert fidelity_metric_for(name) == metric


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("extractor_weights")


@pytest.mark.parametrize("condition", sanity.CONDITIONS)
def test_degenerate_samples_score_clearly_below_a_matching_one(condition, weights_dir):
    assert condition in list_extractors(), f"no extractor registered for {condition!r}"
    case = sanity.run_case(condition, SIZE, weights_dir)
    print(sanity.table([case]))
    assert case.metric == EXPECTED_METRIC[condition]
    assert case.matching >= 0.75, case
    for name, score in case.degenerate.items():
        assert not math.isnan(score), (name, case)
        assert score <= case.matching - 0.5, (name, case)
