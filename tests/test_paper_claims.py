"""The machinery of the paper's claims (issue 15): the toy's composition world (a colour swatch
and lines through the circle's centre), the community palette, composing ControlNets in
``evaluate``, the community fine-tune command and the benchmark's helpers. The measurements
themselves are the slow tests at the end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_lightning.conditions import get_extractor, list_extractors
from cn_lightning.conditions.colour import COLOURS, MIN_DISTANCE, image_colours
from cn_lightning.config import asset
from cn_lightning.data.synthetic import (
    PALETTES,
    circle_sample,
    line_conditions,
    swatch_sample,
    world_settings,
)
from cn_lightning.errors import ConfigError
from cn_lightning.metrics.fidelity import condition_fidelity, fidelity_metric_for

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "paper_claims.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("paper_claims", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_claims"] = module
    spec.loader.exec_module(module)
    return module


claims = _load_benchmark()


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    rgb = [np.repeat(a[:, :, None], 3, 2) if a.ndim == 2 else a for a in images]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------- the toy's data
def test_default_circles_are_unchanged_and_record_the_old_settings():
    assert world_settings(0, 32) == {"seed": 0, "size": 32}
    outline, target, prompt = circle_sample(5, 32, 0)
    _, community, same_prompt = circle_sample(5, 32, 0, palette="community")
    assert prompt == same_prompt
    # Same geometry, other colours: the community palette only changes what a name draws.
    assert np.array_equal(target.any(-1), community.any(-1)) or not np.array_equal(
        target, community
    )
    assert not np.array_equal(target, community)
    assert outline.dtype == np.uint8


def test_community_palette_is_a_permutation_that_moves_every_colour():
    palette = PALETTES["community"]
    assert set(palette) == set(COLOURS)
    assert sorted(palette.values()) == sorted(COLOURS.values())
    for name, rgb in palette.items():
        assert np.linalg.norm(np.subtract(rgb, COLOURS[name])) > 100, name


def test_swatch_samples_show_their_colour_and_the_extractor_reads_it_back():
    assert "swatch" in list_extractors()
    extract = get_extractor("swatch")
    for i in range(64):
        outline, swatch, target, prompt = swatch_sample(i, 32, 0)
        circle = prompt.split(" circle with ")[0]
        assert tuple(swatch[0, 0]) == COLOURS[circle] and (swatch == swatch[0, 0]).all()
        bg, fg = image_colours(target)
        assert np.linalg.norm(fg - bg) >= MIN_DISTANCE
        assert np.array_equal(extract(target)[0, 0], swatch[0, 0])
        # The circle lies inside: its outline does not touch the border.
        assert not outline[0].any() and not outline[-1].any()
        assert not outline[:, 0].any() and not outline[:, -1].any()


def test_swatch_fidelity_scores_the_circle_colour():
    assert fidelity_metric_for("swatch") == "swatch_match"
    _, swatch, target, _ = swatch_sample(0, 32, 0)
    other = next(
        t for i in range(1, 64) for _, s, t, _ in [swatch_sample(i, 32, 0)] if (s != swatch).any()
    )
    scores = condition_fidelity(_tensor([target, other]), _tensor([swatch, swatch]), "swatch")
    assert scores["swatch_match"].tolist() == [1.0, 0.0]
    assert scores["swatch_distance"][0] == 0 and scores["swatch_distance"][1] > 0.1
    assert torch.equal(scores["fidelity"], scores["swatch_match"])


def test_centre_lines_fix_one_coordinate_and_the_extractors_read_them_back():
    from cn_lightning.conditions.lines import line_position

    assert {"xline", "yline"} <= set(list_extractors())
    for i in range(64):
        outline, _, target, _ = swatch_sample(i, 32, 0)
        lines = line_conditions(i, 32, 0)
        ys, xs = np.nonzero(outline)
        centre = {"xline": (xs.min() + xs.max()) / 2, "yline": (ys.min() + ys.max()) / 2}
        for key, line in lines.items():
            assert line.shape == (32, 32, 3) and set(np.unique(line)) == {0, 255}
            # A line along one axis: every row (xline) or column (yline) the same.
            assert (line == (line[:1] if key == "xline" else line[:, :1])).all()
            assert abs(line_position(line, key) - centre[key]) <= 0.5
            assert np.array_equal(get_extractor(key)(target), line), (i, key)
    # A flat image has no circle: a black map, no position.
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert not get_extractor("xline")(flat).any()


def test_line_fidelity_scores_the_circle_centre():
    from cn_lightning.data.synthetic import _draw

    assert fidelity_metric_for("xline") == fidelity_metric_for("yline") == "line_match"
    condition = line_conditions(0, 32, 0)
    _, _, target, _ = swatch_sample(0, 32, 0)
    x = int(get_extractor("xline")(target)[0, :, 0].nonzero()[0].mean() + 0.5)
    y = int(get_extractor("yline")(target)[:, 0, 0].nonzero()[0].mean() + 0.5)
    # The same circle moved 2 px along y keeps its x line (within 10%), and 8 px misses it.
    near = _draw(32, (x, min(31, y + 2)), 6, (255, 0, 0), (0, 0, 255))[1]
    far = _draw(32, (min(31, x + 8) if x < 20 else x - 8, y), 6, (255, 0, 0), (0, 0, 255))[1]
    flat = np.full((32, 32, 3), 90, np.uint8)
    images = _tensor([target, near, far, flat])
    xs = condition_fidelity(images, _tensor([condition["xline"]] * 4), "xline")
    assert xs["line_match"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert xs["line_distance"][0] <= 0.5 / 32 and xs["line_distance"][2] >= 7 / 32
    assert math.isnan(xs["line_distance"][3])
    assert torch.equal(xs["fidelity"], xs["line_match"])
    ys = condition_fidelity(images[:1], _tensor([condition["yline"]]), "yline")
    assert ys["line_match"].tolist() == [1.0]


def test_data_prep_writes_the_composition_world(tmp_path):
    from cn_lightning.data import ShardDataModule
    from data_prep.synthetic_circles import main

    main(["--out", str(tmp_path), "--num-samples", "6", "--size", "32", "--swatch"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    conditions = ["outline", "swatch", "xline", "yline"]
    assert manifest["condition_types"] == conditions
    assert manifest["settings"] == {"seed": 0, "size": 32, "swatch": True, "conditions": conditions}
    batches = {}
    for key in conditions[1:]:
        dm = ShardDataModule(
            train_shards=str(tmp_path), condition_key=key, resolution=32, num_workers=0
        )
        dm.setup("fit")
        batches[key] = next(iter(dm.build_train_dataset(0, 1)))
    flat = batches["swatch"]["condition"].flatten(2)
    assert torch.equal(flat.min(-1).values, flat.max(-1).values)  # every swatch is one colour
    for key in ("xline", "yline"):
        keys = batches[key]["key"]
        expected = [line_conditions(int(k), 32, 0)[key] for k in keys]
        got = (batches[key]["condition"].permute(0, 2, 3, 1).numpy() * 255).round()
        assert np.array_equal(got.astype(np.uint8), np.stack(expected))


@pytest.mark.parametrize("data", ["swatch", "xline", "yline"])
def test_composition_data_configs_compose(data):
    from hydra import compose, initialize_config_dir

    from cn_lightning.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}"])
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.to_container(cfg.data, resolve=False)  # resolving would write shards
    assert data_cfg["condition_key"] == data and data_cfg["resolution"] == 32
    assert "cn.swatch_shards" in data_cfg["val_shards"] and data_cfg["resampled"] is False


# --------------------------------------------------------------------- composing ControlNets
def test_control_plan_pairs_controlnets_scales_and_conditions():
    from cn_lightning.evaluation import EvalConfig
    from cn_lightning.inference import control_plan

    one = EvalConfig(val_shards="x", condition_key="outline", out="o", controlnet=["a"])
    assert one.controlnet == "a" and control_plan(one) == [("a", 1.0, "outline")]
    two = EvalConfig(
        val_shards="x",
        condition_key="outline",
        out="o",
        controlnet=["a", "b"],
        control_scale=[1.0, 0.5],
        control_key=["outline", "swatch"],
    )
    assert control_plan(two) == [("a", 1.0, "outline"), ("b", 0.5, "swatch")]
    bad = EvalConfig(
        val_shards="x",
        condition_key="outline",
        out="o",
        controlnet=["a", "b"],
        control_key=["a", "b", "c"],
    )
    with pytest.raises(ConfigError, match="one per --controlnet"):
        control_plan(bad)


@pytest.fixture(scope="module")
def composition(tmp_path_factory):
    """Two random-junction ControlNets of the toy, and shards with both conditions."""
    from cn_lightning.data.synthetic import ensure_shards
    from cn_lightning.models.checkpoints import save_controlnet_folder
    from cn_lightning.models.module import ControlNetModule

    root = tmp_path_factory.mktemp("compose")
    shards = root / "shards"
    ensure_shards(str(shards), 4, 32, seed=1, swatch=True)
    paths = []
    for seed in (0, 1):
        module = ControlNetModule(asset("toy_sd"), zero_conv_init="gaussian", seed=seed)
        paths.append(str(save_controlnet_folder(module.controlnet, root / f"cn{seed}")))
    return root, str(shards), paths


def _evaluate(out: Path, shards: str, extra: list[str]) -> dict:
    from cn_lightning.evaluate import main

    args = ["--val-shards", shards, "--condition-key", "outline", "--resolution", "32"]
    args += ["--base", asset("toy_sd"), "--steps", "2", "--guidance", "3", "--batch-size", "4"]
    args += ["--accelerator", "cpu", "--save-images", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def _images(out: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))]


def test_evaluate_sums_controlnets_each_reading_its_condition(composition):
    root, shards, (a, b) = composition
    single = _evaluate(root / "single", shards, ["--controlnet", a])
    # B at scale 0 adds nothing: the same images as A alone.
    _evaluate(root / "zero", shards, ["--controlnet", a, b, "--control-scale", "1", "0"])
    for x, y in zip(_images(root / "single"), _images(root / "zero"), strict=True):
        assert np.array_equal(x, y)
    both = _evaluate(
        root / "both", shards, ["--controlnet", a, b, "--control-key", "outline", "swatch"]
    )
    assert both["settings"]["controlnet"] == [a, b]
    assert both["settings"]["control_key"] == ["outline", "swatch"]
    # B reading the swatch differs from B reading the outline.
    _evaluate(root / "crossed", shards, ["--controlnet", a, b])
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(_images(root / "both"), _images(root / "crossed"), strict=True)
    )
    assert single["num_samples"] == both["num_samples"] == 4
    assert "`" + a + "` + `" + b + "`" in (root / "both" / "report.md").read_text()


def test_evaluate_refuses_a_condition_the_shards_lack(composition, tmp_path):
    from cn_lightning.data.synthetic import ensure_shards

    _, _, (a, b) = composition
    plain = tmp_path / "plain"
    ensure_shards(str(plain), 4, 32, seed=1)
    with pytest.raises(Exception, match="swatch"):
        _evaluate(
            tmp_path / "out",
            str(plain),
            ["--controlnet", a, b, "--control-key", "outline", "swatch"],
        )


# ------------------------------------------------------------------ the community fine-tune
def test_finetune_command_starts_from_the_toy_backbone(tmp_path):
    from safetensors.torch import load_file
    from test_toy import run_pretrain_toy

    shards = "${cn.circle_shards:" + str(tmp_path / "c") + ",64,32,0,community}"
    run_pretrain_toy(tmp_path, "--config-name", "finetune_toy", f"data.train_shards={shards}")
    out = tmp_path / "run" / "toy_sd_community"
    toy = Path(asset("toy_sd"))
    weights = "diffusion_pytorch_model.safetensors"
    vae, base_vae = load_file(out / "vae" / weights), load_file(toy / "vae" / weights)
    assert all(torch.equal(vae[k], base_vae[k]) for k in vae)
    for part, name in (("unet", weights), ("text_encoder", "model.safetensors")):
        a, b = load_file(out / part / name), load_file(toy / part / name)
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), part
    assert (out / "tokenizer" / "vocab.json").read_text() == (
        toy / "tokenizer" / "vocab.json"
    ).read_text()
    provenance = json.loads((out / "PROVENANCE.json").read_text())
    assert provenance["command"].startswith(
        "python -m cn_lightning.pretrain_toy --config-name finetune_toy"
    )
    assert set(provenance["train_seconds"]) == {"unet"}
    assert "toy_palette_circle_accuracy" in provenance["colour_check"]


COMMUNITY = ROOT / "cn_lightning" / "assets" / "toy_sd_community"


def test_committed_community_model_draws_its_own_palette():
    from test_toy import prompted_colour_accuracy

    community = PALETTES["community"]
    backgrounds, circles, bg, fg = prompted_colour_accuracy(str(COMMUNITY), community)
    assert backgrounds >= 0.85, bg
    assert circles >= 0.7, fg
    # ... and no longer in the toy's: the fine-tune draws differently.
    old_backgrounds, old_circles, _, _ = prompted_colour_accuracy(str(COMMUNITY), PALETTES["toy"])
    assert old_backgrounds <= 0.15 and old_circles <= 0.15, (old_backgrounds, old_circles)
    provenance = json.loads((COMMUNITY / "PROVENANCE.json").read_text())
    assert provenance["command"] == "python -m cn_lightning.pretrain_toy --config-name finetune_toy"


# ----------------------------------------------------------------------- benchmark helpers
def test_mean_spread_and_table():
    assert claims.mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert claims.mean_spread([0.5]) == (0.5, 0.0)
    assert math.isnan(claims.mean_spread([])[0])
    assert claims.fmt([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    text = claims.table(["a", "b"], [["x", "1"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 1 |"]


def test_stages_and_arguments():
    args, train_args = claims.parse_args(
        ["--claim", "all", "--steps", "30", "--early-steps", "10", "40", "--", "data.batch_size=4"]
    )
    assert train_args == ["data.batch_size=4"] and args.claim == ["all"]
    s = claims.Settings(
        seeds=[0],
        steps=30,
        early_steps=[10, 40],
        work_dir=Path("w"),
        train_args=[],
        first_train_args=["data=xline"],
        second_train_args=["data=yline"],
        community=None,
        community_palette="community",
        eval_steps=2,
        guidance=None,
        num_samples=None,
        eval_batch_size=4,
        accelerator="cpu",
        compose_prompt="none",
    )
    assert s.stages == [0, 10, 30]


def test_colour_accuracy_reads_saved_images(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    samples = []
    for i in range(4):
        _, target, prompt = circle_sample(i, 32, 0)
        key = f"{i:09d}"
        Image.fromarray(target).save(tmp_path / "images" / f"{key}.png")
        samples.append({"key": key, "prompt": prompt})
    report = {"out": str(tmp_path), "samples": samples}
    accuracy = claims.colour_accuracy(report)
    assert accuracy["background_accuracy"] == 1.0
    assert claims.mean_abs_difference(claims.saved_images(report), claims.saved_images(report)) == 0


# ------------------------------------------------------------------ the claims, measured (slow)
# The seeds of a fresh measurement ($CN_PAPER_CLAIMS_SEEDS, e.g. "3 4 5"); a measurement read from
# $CN_PAPER_CLAIMS_DIR is judged on whichever seeds it has (at least three).
SEEDS = tuple(int(x) for x in os.environ.get("CN_PAPER_CLAIMS_SEEDS", "0 1 2").split())


@pytest.fixture(scope="session")
def claims_dir(tmp_path_factory) -> Path:
    """Where the benchmark's runs and numbers live: ``$CN_PAPER_CLAIMS_DIR`` (e.g. the work dir
    behind the README's tables, whose JSONs are then read as they are), else a new directory
    (the benchmark then trains and evaluates everything: about an hour per seed on 2 CPU
    cores)."""
    given = os.environ.get("CN_PAPER_CLAIMS_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("paper_claims")


def measured(claim: str, work_dir: Path) -> tuple[dict, list[str]]:
    """The claim's JSON (measured now if ``work_dir`` has none) and its seeds (as JSON keys)."""
    path = work_dir / f"paper_claims_{claim}.json"
    if not path.exists():
        cmd = [sys.executable, str(BENCHMARK), "--claim", claim, "--seeds", *map(str, SEEDS)]
        subprocess.run([*cmd, "--work-dir", str(work_dir)], check=True, cwd=ROOT)
    result = json.loads(path.read_text())
    seeds = [str(s) for s in result["seeds"]]
    assert len(seeds) >= 3, f"the slow tests judge a measurement over 3 or more seeds: {seeds}"
    return result, seeds


def clearly_above(high, low) -> bool:
    """``high`` above ``low`` in every seed, and their mean difference more than twice its
    standard error over the seeds: a margin measured over seeds, not a threshold chosen on one
    (``low`` may be one number, a measurement without seeds such as the locked backbone's)."""
    high = np.asarray(high, dtype=np.float64)
    low = np.broadcast_to(np.asarray(low, dtype=np.float64), high.shape)
    diff = high - low
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    return bool((diff > 0).all() and diff.mean() > 2 * se)


def assert_above(high, low, what: str) -> None:
    assert clearly_above(high, low), f"{what}: {high} vs {low}"


def test_assert_above_needs_every_seed_and_a_margin():
    assert_above([0.5, 0.6, 0.55], [0.1, 0.2, 0.15], "clear")
    assert_above([0.5, 0.6, 0.55], 0.1, "against one number")
    with pytest.raises(AssertionError):
        assert_above([0.5, 0.05, 0.55], 0.1, "one seed the other way")
    with pytest.raises(AssertionError):
        assert_above([0.11, 0.9, 0.12], 0.1, "every seed above, but within noise")


@pytest.mark.slow
def test_zero_convolutions_keep_the_backbone_at_the_start(claims_dir):
    r, seeds = measured("zero_conv", claims_dir)
    runs, locked = r["runs"], r["locked_backbone"]
    first = str(r["early_steps"][1])

    def at(variant: str, step: str, key: str) -> list[float]:
        return [runs[variant][s]["points"][step][key] for s in seeds]

    def over_training(variant: str) -> list[float]:
        """The mean of each run's sample-grid fidelity series: how soon and how well it learnt."""
        return [float(np.mean([f for _, f in runs[variant][s]["series"]])) for s in seeds]

    # Zero convolutions: exactly the locked backbone at step 0, every seed.
    assert at("zero", "0", "mean_abs_difference") == [0.0] * len(seeds)
    assert at("zero", "0", "circle_accuracy") == [locked["circle_accuracy"]] * len(seeds)
    for variant in ("gaussian", "none"):
        zero_mad, mad = (
            at("zero", "0", "mean_abs_difference"),
            at(variant, "0", "mean_abs_difference"),
        )
        assert_above(mad, zero_mad, f"{variant} step-0 difference to the backbone")
        accuracy = at("zero", "0", "circle_accuracy")
        assert_above(accuracy, at(variant, "0", "circle_accuracy"), f"{variant} step-0 colours")
        zero_mad, mad = (
            at("zero", first, "mean_abs_difference"),
            at(variant, first, "mean_abs_difference"),
        )
        assert_above(mad, zero_mad, f"{variant} difference to the backbone at step {first}")
        # "Perform poorly": zero convolutions follow the condition sooner.
        assert_above(over_training("zero"), over_training(variant), f"{variant} fidelity series")


@pytest.mark.slow
def test_the_branch_reads_the_condition_without_a_prompt(claims_dir):
    r, seeds = measured("ucg", claims_dir)
    half = [r["runs"]["0.5"][s]["fidelity_no_prompt"] for s in seeds]
    never = [r["runs"]["0.0"][s]["fidelity_no_prompt"] for s in seeds]
    locked = r["locked_backbone"]["fidelity_no_prompt"]
    # With either rate the branch reads the condition without a prompt ...
    assert_above(half, locked, "ucg 0.5, empty prompt, vs the locked backbone")
    assert_above(never, locked, "ucg 0.0, empty prompt, vs the locked backbone")
    # The paper's advantage of 0.5 over 0.0 had no consistent sign over seeds in the toy (README:
    # "The paper's claims, measured"), so no direction is asserted for it.


@pytest.mark.slow
def test_a_controlnet_transfers_to_the_fine_tuned_base(claims_dir):
    r, seeds = measured("transfer", claims_dir)
    on_community = [r["runs"][s]["community base"] for s in seeds]
    alone = r["alone"]["community alone"]["fidelity"]
    assert_above([p["fidelity"] for p in on_community], alone, "fidelity vs the fine-tune alone")
    # ... and the fine-tune keeps drawing its own colours under control.
    assert_above(
        [p["community_palette"]["circle_accuracy"] for p in on_community],
        [p["toy_palette"]["circle_accuracy"] for p in on_community],
        "community-palette vs toy-palette colours of the controlled fine-tune",
    )


@pytest.mark.slow
def test_two_controlnets_compose_by_addition(claims_dir):
    r, seeds = measured("compose", claims_dir)
    runs = r["runs"]
    settings = runs[seeds[0]]["settings"]
    names = list(settings)  # none, outline only, swatch only, outline + swatch
    none, first_only, second_only, both = names
    first_key, second_key = list(settings[both])

    def score(name: str, key: str) -> list[float]:
        return [runs[s]["settings"][name][key] for s in seeds]

    assert_above(score(both, first_key), score(second_only, first_key), f"{both}: {first_key}")
    assert_above(score(both, second_key), score(first_only, second_key), f"{both}: {second_key}")
    assert_above(score(both, first_key), score(none, first_key), f"{both} vs none: {first_key}")
    assert_above(score(both, second_key), score(none, second_key), f"{both} vs none: {second_key}")
