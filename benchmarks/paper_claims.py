"""The paper's claims, measured: zero convolutions, prompt dropping, transfer, composition.

    python benchmarks/paper_claims.py --claim zero_conv ucg transfer compose --seeds 0 1 2 \\
        [--steps 1500] [--early-steps 10 50 150] [--work-dir outputs/paper_claims] \\
        [-- TRAIN OVERRIDES ...]

Every training run is ``python -m cn_lightning.train`` and every measurement
``python -m cn_lightning.evaluate`` (its ``--save-images`` PNGs are then read for the colour
statistics); no model code runs in this script. By default everything happens in the toy world of
the quickstart (the packaged toy backbone, 32 px synthetic circles, CPU); the runs take the
quickstart's settings, and overrides after ``--`` go to every training run, so the same script
runs at SD1.5 scale on GPUs (e.g. ``--steps 20000 --early-steps 50 200 1000 -- +experiment=canny
model.pretrained_model_path=... data.train_shards=...``, with ``--community`` a fine-tuned SD1.5
and ``--second-train-args`` the second condition's data).

Claims (``--claim``; runs are shared between claims and reused when complete):

- ``zero_conv``: ``model.zero_conv_init`` zero | gaussian | none. At step 0 and after each of
  ``--early-steps``, against the locked backbone (control scale 0, the same noise per sample):
  the prompt-colour accuracy of the samples (the colour statistic of ``tests/test_toy.py``:
  background and circle colour named against the toy palette, vs. the prompt's), the mean
  absolute difference of the samples (pixels in [0, 1]), and the held-out fidelity; plus the
  fidelity series of the training run's sample grids (``convergence.json``).
- ``ucg``: ``model.ucg_rate`` 0.5 (the paper) vs 0.0; held-out fidelity of samples generated with
  the prompt and with an empty prompt (``evaluate --no-prompt``: the paper's guess mode).
- ``transfer``: the ControlNet trained on the toy backbone, evaluated on the toy "community
  model" (``--community``, default ``cn_lightning/assets/toy_sd_community``), vs on its own base,
  vs the community model alone (control scale 0); with the circle-colour accuracy in the
  community palette (the fine-tune still draws its own colours) and in the toy's.
- ``compose``: two ControlNets on two conditions (``--first-train-args`` / ``--second-train-args``,
  default ``data=xline`` / ``data=yline``: lines through the circle's centre, each fixing one
  coordinate), summed (``evaluate --controlnet A B --control-key xline yline``) on held-out
  samples that have both conditions; each condition scored by its own fidelity (``line_match``:
  the circle's centre within 10% of the image of the line), without prompts by default
  (``--compose-prompt``), for none / either / both ControlNets.

Each claim prints a Markdown table (mean ± spread over seeds: the standard deviation across
seeds, 0 for one seed), writes ``<work dir>/paper_claims_<claim>.json`` (every number, per seed)
and a figure ``<work dir>/paper_claims_<claim>.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CLAIMS = ("zero_conv", "ucg", "transfer", "compose")
VARIANTS = ("zero", "gaussian", "none")
# Training runs by name: the overrides that make them (besides seed, steps and --). The zero run
# is the paper's recipe (zero convolutions, 50% empty prompts): every claim uses it.
RUN_OVERRIDES: dict[str, list[str]] = {
    "zero": [],
    "gaussian": ["model.zero_conv_init=gaussian"],
    "none": ["model.zero_conv_init=none"],
    "ucg0": ["model.ucg_rate=0.0"],
}
# Runs that keep snapshots at step 0 and after the early steps (claim zero_conv).
STAGED = set(VARIANTS)
PROMPT = re.compile(r"^(?P<circle>.+) circle with (?P<background>.+) background$")


# ------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    seeds: list[int]
    steps: int
    early_steps: list[int]
    work_dir: Path
    train_args: list[str]
    first_train_args: list[str]
    second_train_args: list[str]
    community: str | None
    community_palette: str
    eval_steps: int
    guidance: float | None
    num_samples: int | None
    eval_batch_size: int
    accelerator: str
    compose_prompt: str
    env: dict[str, str] = field(default_factory=dict)
    # What the current claim's runs and evaluations took, cached ones included (each once):
    # "train" / "evaluate" -> {run or evaluation: seconds}.
    spent: dict[str, dict[str, float]] = field(
        default_factory=lambda: {"train": {}, "evaluate": {}}
    )

    @property
    def stages(self) -> list[int]:
        """Steps at which the staged runs keep a snapshot: 0, the early steps, the last one."""
        return sorted({0, *(s for s in self.early_steps if 0 < s < self.steps), self.steps})


def run_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def call(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run a public command line; its output goes to ``log``. Returns its wall time (s)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        result = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------- training
def run_dir(s: Settings, name: str, seed: int) -> Path:
    return s.work_dir / "runs" / f"{name}_seed{seed}"


def snapshot(s: Settings, name: str, seed: int, step: int) -> Path:
    """The ControlNet of run ``name`` at ``step`` (a diffusers folder)."""
    return run_dir(s, name, seed) / "snapshots" / f"step_{step:07d}"


def train(s: Settings, name: str, seed: int) -> dict[str, Any]:
    """Train run ``name`` with ``seed`` to ``s.steps`` (resuming where it stopped); staged runs
    stop at every stage and keep the ControlNet there. Returns the run's wall times."""
    directory = run_dir(s, name, seed)
    compose_args = {"compose_a": s.first_train_args, "compose_b": s.second_train_args}
    overrides = compose_args[name] if name in compose_args else RUN_OVERRIDES[name]
    stages = s.stages if name in STAGED else [s.steps]
    timing_file = directory / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    for stage in stages:
        if snapshot(s, name, seed, stage).exists():
            continue
        cmd = [
            sys.executable,
            "-m",
            "cn_lightning.train",
            f"seed={seed}",
            f"hydra.run.dir={directory}",
            f"trainer.max_steps={stage}",
            "trainer.enable_progress_bar=false",
            "logger=none",
            *s.train_args,
            *overrides,
        ]
        if stage < s.steps:
            # A stage's end is not the run's: no end-of-training grid (a resumed run would not
            # keep it in its series anyway).
            cmd.append("callbacks.samples.at_end=false")
        timing[f"stage_{stage}_s"] = round(call(cmd, s.env, directory / "benchmark.log"), 1)
        shutil.copytree(directory / "controlnet", snapshot(s, name, seed, stage))
        timing_file.write_text(json.dumps(timing, indent=2))
    s.spent["train"][directory.name] = float(sum(timing.values()))
    return timing


def run_config(directory: Path) -> dict[str, Any]:
    """Base model, validation shards and sampling settings of a run (its resolved config)."""
    from omegaconf import OmegaConf

    from cn_lightning.config import register_resolvers

    register_resolvers()
    cfg = OmegaConf.load(directory / ".hydra" / "config.yaml")
    return {
        "base": str(cfg.model.pretrained_model_path),
        "val_shards": str(cfg.data.val_shards),
        "condition_key": str(cfg.data.condition_key),
        "resolution": int(cfg.data.resolution),
        "guidance": float(cfg.model.guidance_scale),
    }


def fidelity_series(directory: Path) -> list[tuple[int, float]]:
    """The sample grids' held-out fidelity over training (``convergence.json``)."""
    path = directory / "convergence.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    return [
        (int(p["step"]), float(p["fidelity"]))
        for p in report.get("series", [])
        if p.get("fidelity") is not None
    ]


# ------------------------------------------------------------------------------ evaluation
def evaluate(
    s: Settings,
    label: str,
    controlnets: Sequence[Path | str],
    *,
    base: str,
    val_shards: str,
    condition_key: str,
    resolution: int,
    guidance: float,
    control_scales: Sequence[float] = (1.0,),
    control_keys: Sequence[str] | None = None,
    no_prompt: bool = False,
    images: Path | None = None,
) -> dict[str, Any]:
    """``python -m cn_lightning.evaluate`` (images saved); returns its ``report.json``, with
    ``out``. Cached by its arguments under ``<work dir>/evals``."""
    args = [
        "--val-shards",
        val_shards,
        "--condition-key",
        condition_key,
        "--resolution",
        str(resolution),
        "--batch-size",
        str(s.eval_batch_size),
        "--accelerator",
        s.accelerator,
    ]
    if s.num_samples:
        args += ["--num-samples", str(s.num_samples)]
    if images is not None:
        args += ["--images", str(images)]
    else:
        args += ["--base", base, "--controlnet", *map(str, controlnets)]
        args += ["--control-scale", *map(str, control_scales)]
        if control_keys:
            args += ["--control-key", *control_keys]
        args += ["--steps", str(s.eval_steps), "--guidance", str(guidance), "--save-images"]
        if no_prompt:
            args.append("--no-prompt")
    digest = hashlib.sha1("\0".join(args).encode()).hexdigest()[:10]
    # The same arguments are the same evaluation, whichever claim asks for it first.
    done = sorted((s.work_dir / "evals").glob(f"*-{digest}/report.json"))
    out = done[0].parent if done else s.work_dir / "evals" / f"{label}-{digest}"
    report_path = out / "report.json"
    wall_file = out / "benchmark_wall_s.txt"
    if not report_path.exists():
        wall = call(
            [sys.executable, "-m", "cn_lightning.evaluate", *args, "--out", str(out)],
            s.env,
            s.work_dir / "evals" / f"{label}-{digest}.log",
        )
        wall_file.write_text(f"{wall:.1f}\n")
    if wall_file.exists():
        s.spent["evaluate"][out.name] = float(wall_file.read_text())
    report = json.loads(report_path.read_text())
    report["out"] = str(out)
    return report


def saved_images(report: dict[str, Any]) -> dict[str, np.ndarray]:
    """Key -> image (H, W, 3) float in [0, 1] of an evaluation with ``--save-images``."""
    folder = Path(report["out"]) / "images"
    return {
        r["key"]: np.asarray(Image.open(folder / f"{r['key']}.png").convert("RGB"), np.float32)
        / 255
        for r in report["samples"]
    }


def mean_abs_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Mean absolute pixel difference (in [0, 1]) of two image sets with the same keys."""
    return float(np.mean([np.abs(a[k] - b[k]).mean() for k in a]))


def colour_accuracy(report: dict[str, Any], palette: str = "toy") -> dict[str, float]:
    """Share of samples whose circle / background colour, read by the colour statistic of
    ``tests/test_toy.py``, is the prompt's (named against ``palette``)."""
    import torch

    from cn_lightning.conditions.colour import colour_statistics, nearest_colour_names
    from cn_lightning.data.synthetic import PALETTES

    images = saved_images(report)
    keys, wanted = [], []
    for record in report["samples"]:
        match = PROMPT.match(record["prompt"])
        if match:
            keys.append(record["key"])
            wanted.append((match["circle"], match["background"]))
    if not keys:
        return {"circle_accuracy": math.nan, "background_accuracy": math.nan}
    batch = torch.from_numpy(np.stack([images[k] for k in keys])).permute(0, 3, 1, 2)
    bg, fg = colour_statistics(batch)
    colours = PALETTES[palette]
    circles = nearest_colour_names(fg, colours)
    backgrounds = nearest_colour_names(bg, colours)
    return {
        "circle_accuracy": float(
            np.mean([c == w for c, (w, _) in zip(circles, wanted, strict=True)])
        ),
        "background_accuracy": float(
            np.mean([b == w for b, (_, w) in zip(backgrounds, wanted, strict=True)])
        ),
    }


def fidelity_of(report: dict[str, Any]) -> float:
    return float(report["metrics"].get("fidelity", math.nan))


# ------------------------------------------------------------------------------ statistics
def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation across seeds (ddof 1; 0 for a single seed)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, spread = mean_spread(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ claims
def claim_zero_conv(s: Settings) -> tuple[dict[str, Any], str, Image.Image]:
    per: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in VARIANTS}
    for variant in VARIANTS:
        for seed in s.seeds:
            timing = train(s, variant, seed)
            per[variant][seed] = {
                "timing": timing,
                "series": fidelity_series(run_dir(s, variant, seed)),
            }
    c = run_config(run_dir(s, "zero", s.seeds[0]))
    common = dict(
        base=c["base"],
        val_shards=c["val_shards"],
        condition_key=c["condition_key"],
        resolution=c["resolution"],
        guidance=s.guidance if s.guidance is not None else c["guidance"],
    )
    locked = evaluate_locked(s, common)
    locked_images = saved_images(locked)
    reference = {"fidelity": fidelity_of(locked), **colour_accuracy(locked)}
    shown: list[tuple[str, dict[str, Any]]] = [("locked backbone", locked)]
    for variant in VARIANTS:
        for seed in s.seeds:
            points = {}
            for step in s.stages:
                report = evaluate(
                    s,
                    f"{variant}_seed{seed}_step{step}",
                    [snapshot(s, variant, seed, step)],
                    **common,
                )
                if seed == s.seeds[0] and step in s.stages[:2]:
                    shown.append((f"{variant}, step {step}", report))
                points[step] = {
                    "fidelity": fidelity_of(report),
                    "mean_abs_difference": mean_abs_difference(saved_images(report), locked_images),
                    **colour_accuracy(report),
                    "eval": report["out"],
                }
            per[variant][seed]["points"] = points
    rows = []
    for variant in VARIANTS:
        for step in s.stages:
            pts = [per[variant][seed]["points"][step] for seed in s.seeds]
            rows.append(
                [
                    variant,
                    step,
                    fmt([p["circle_accuracy"] for p in pts]),
                    fmt([p["background_accuracy"] for p in pts]),
                    fmt([p["mean_abs_difference"] for p in pts], 4),
                    fmt([p["fidelity"] for p in pts]),
                ]
            )
    rows.append(
        [
            "locked backbone",
            "-",
            f"{reference['circle_accuracy']:.3f}",
            f"{reference['background_accuracy']:.3f}",
            "0",
            f"{reference['fidelity']:.3f}",
        ]
    )
    text = table(
        [
            "zero_conv_init",
            "step",
            "circle colour = prompt's",
            "background colour = prompt's",
            "mean abs. difference to the locked backbone",
            "held-out fidelity (circle IoU)",
        ],
        rows,
    )
    series_rows = series_table(per, s.seeds)
    text += "\n\nHeld-out fidelity of the sample grids over training (convergence.json):\n\n"
    text += series_rows

    def stage_bars(key: str) -> dict:
        """Per variant: mean ± spread over seeds of ``key`` at each stage."""
        return {
            v: [mean_spread([per[v][seed]["points"][k][key] for seed in s.seeds]) for k in s.stages]
            for v in VARIANTS
        }

    figure = stack(
        [
            line_chart(
                {v: mean_series([per[v][seed]["series"] for seed in s.seeds]) for v in VARIANTS},
                "sample-grid fidelity over training (mean over seeds)",
                "step",
            ),
            bar_chart(
                [f"step {k}" for k in s.stages],
                stage_bars("mean_abs_difference"),
                "mean abs. difference to the locked backbone's samples (same noise)",
            ),
            bar_chart(
                [f"step {k}" for k in s.stages],
                stage_bars("circle_accuracy"),
                f"circle colour = prompt's (locked backbone: {reference['circle_accuracy']:.2f})",
            ),
            image_strip(shown, conditions_from=locked),
        ]
    )
    return {"locked_backbone": reference, "runs": per}, text, figure


def evaluate_locked(s: Settings, common: dict[str, Any], no_prompt: bool = False) -> dict:
    """The locked backbone alone (control scale 0; the zero run's step-0 ControlNet, whose
    residuals are multiplied by 0), with the same per-sample noise as every other evaluation."""
    label = "locked_noprompt" if no_prompt else "locked"
    first = snapshot(s, "zero", s.seeds[0], 0)
    return evaluate(s, label, [first], control_scales=[0.0], no_prompt=no_prompt, **common)


def series_table(per: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> str:
    steps = sorted({step for v in per for seed in seeds for step, _ in per[v][seed]["series"]})
    header = ["zero_conv_init", *[str(k) for k in steps]]
    rows = []
    for variant, by_seed in per.items():
        values = {k: [] for k in steps}
        for seed in seeds:
            for step, value in by_seed[seed]["series"]:
                values[step].append(value)
        rows.append([variant, *[f"{mean_spread(values[k])[0]:.2f}" for k in steps]])
    return table(header, rows)


def mean_series(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for one in series:
        for step, value in one:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[k])) for k in steps]


def claim_ucg(s: Settings) -> tuple[dict[str, Any], str, Image.Image]:
    per: dict[str, dict[int, dict[str, Any]]] = {"0.5": {}, "0.0": {}}
    reports = {}
    for rate, name in (("0.5", "zero"), ("0.0", "ucg0")):
        for seed in s.seeds:
            timing = train(s, name, seed)
            c = run_config(run_dir(s, name, seed))
            common = eval_common(s, c)
            final = snapshot(s, name, seed, s.steps)
            with_prompt = evaluate(s, f"{name}_seed{seed}_prompt", [final], **common)
            no_prompt = evaluate(
                s, f"{name}_seed{seed}_noprompt", [final], no_prompt=True, **common
            )
            reports[(rate, seed)] = (with_prompt, no_prompt)
            per[rate][seed] = {
                "fidelity_prompt": fidelity_of(with_prompt),
                "fidelity_no_prompt": fidelity_of(no_prompt),
                "timing": timing,
            }
    common = eval_common(s, run_config(run_dir(s, "zero", s.seeds[0])))
    locked = {
        "fidelity_prompt": fidelity_of(evaluate_locked(s, common)),
        "fidelity_no_prompt": fidelity_of(evaluate_locked(s, common, no_prompt=True)),
    }
    rows = [
        [
            rate,
            fmt([per[rate][seed]["fidelity_prompt"] for seed in s.seeds]),
            fmt([per[rate][seed]["fidelity_no_prompt"] for seed in s.seeds]),
        ]
        for rate in per
    ]
    rows.append(
        [
            "locked backbone",
            f"{locked['fidelity_prompt']:.3f}",
            f"{locked['fidelity_no_prompt']:.3f}",
        ]
    )
    text = table(
        ["ucg_rate", "held-out fidelity, with the prompt", "held-out fidelity, empty prompt"], rows
    )
    seed = s.seeds[0]
    figure = stack(
        [
            bar_chart(
                ["with the prompt", "empty prompt"],
                {
                    f"ucg_rate {rate}": [
                        mean_spread([per[rate][x][key] for x in s.seeds])
                        for key in ("fidelity_prompt", "fidelity_no_prompt")
                    ]
                    for rate in per
                },
                "held-out fidelity (circle IoU)",
            ),
            image_strip(
                [
                    (f"ucg {rate}, {mode}", reports[(rate, seed)][i])
                    for rate in per
                    for i, mode in enumerate(("prompt", "no prompt"))
                ],
                conditions_from=reports[("0.5", seed)][0],
            ),
        ]
    )
    return {"runs": per, "locked_backbone": locked}, text, figure


def eval_common(s: Settings, c: dict[str, Any]) -> dict[str, Any]:
    return dict(
        base=c["base"],
        val_shards=c["val_shards"],
        condition_key=c["condition_key"],
        resolution=c["resolution"],
        guidance=s.guidance if s.guidance is not None else c["guidance"],
    )


def community_path(s: Settings) -> str:
    if s.community:
        return s.community
    from cn_lightning.config import asset

    return asset("toy_sd_community")


def claim_transfer(s: Settings) -> tuple[dict[str, Any], str, Image.Image]:
    community = community_path(s)
    per: dict[int, dict[str, Any]] = {}
    shown = {}
    palette = s.community_palette
    for seed in s.seeds:
        timing = train(s, "zero", seed)
        c = run_config(run_dir(s, "zero", seed))
        own = eval_common(s, c)
        other = {**own, "base": community}
        final = snapshot(s, "zero", seed, s.steps)
        reports = {
            "own base": evaluate(s, f"zero_seed{seed}_prompt", [final], **own),
            "community base": evaluate(s, f"zero_seed{seed}_community", [final], **other),
        }
        per[seed] = {"timing": timing}
        for name, report in reports.items():
            per[seed][name] = {
                "fidelity": fidelity_of(report),
                "community_palette": colour_accuracy(report, palette),
                "toy_palette": colour_accuracy(report, "toy"),
            }
        shown.setdefault("ControlNet on its own base", reports["own base"])
        shown.setdefault("ControlNet on the community model", reports["community base"])
    own = eval_common(s, run_config(run_dir(s, "zero", s.seeds[0])))
    alone = {}
    for name, base in (("community alone", community), ("own base alone", own["base"])):
        report = evaluate_locked(s, {**own, "base": base})
        alone[name] = {
            "fidelity": fidelity_of(report),
            "community_palette": colour_accuracy(report, palette),
            "toy_palette": colour_accuracy(report, "toy"),
        }
        shown[f"{name} (control scale 0)"] = report
    rows = []
    for name in ("own base", "community base"):
        pts = [per[seed][name] for seed in s.seeds]
        rows.append(
            [
                f"ControlNet on {'its own base' if name == 'own base' else 'the community model'}",
                fmt([p["fidelity"] for p in pts]),
                fmt([p["community_palette"]["circle_accuracy"] for p in pts]),
                fmt([p["toy_palette"]["circle_accuracy"] for p in pts]),
            ]
        )
    for name, p in alone.items():
        rows.append(
            [
                f"{name} (control scale 0)",
                f"{p['fidelity']:.3f}",
                f"{p['community_palette']['circle_accuracy']:.3f}",
                f"{p['toy_palette']['circle_accuracy']:.3f}",
            ]
        )
    text = table(
        [
            "setting",
            "held-out fidelity (circle IoU)",
            f"circle colour = prompt's, {palette} palette",
            "circle colour = prompt's, toy palette",
        ],
        rows,
    )
    figure = stack(
        [
            bar_chart(
                ["held-out fidelity", f"circle colour ({palette} palette)"],
                {
                    "CN, own base": [
                        mean_spread([per[x]["own base"]["fidelity"] for x in s.seeds]),
                        mean_spread(
                            [
                                per[x]["own base"]["community_palette"]["circle_accuracy"]
                                for x in s.seeds
                            ]
                        ),
                    ],
                    "CN, community": [
                        mean_spread([per[x]["community base"]["fidelity"] for x in s.seeds]),
                        mean_spread(
                            [
                                per[x]["community base"]["community_palette"]["circle_accuracy"]
                                for x in s.seeds
                            ]
                        ),
                    ],
                    "community alone": [
                        (alone["community alone"]["fidelity"], 0.0),
                        (alone["community alone"]["community_palette"]["circle_accuracy"], 0.0),
                    ],
                },
                "transfer to the fine-tuned base",
            ),
            image_strip(list(shown.items()), conditions_from=shown["ControlNet on its own base"]),
        ]
    )
    return {"community": community, "runs": per, "alone": alone}, text, figure


def claim_compose(s: Settings) -> tuple[dict[str, Any], str, Image.Image]:
    no_prompt = s.compose_prompt == "none"
    per: dict[int, dict[str, Any]] = {}
    shown = {}
    for seed in s.seeds:
        timing = {"first": train(s, "compose_a", seed), "second": train(s, "compose_b", seed)}
        first_cfg = run_config(run_dir(s, "compose_a", seed))
        second_cfg = run_config(run_dir(s, "compose_b", seed))
        keys = (first_cfg["condition_key"], second_cfg["condition_key"])
        # Held-out samples with both conditions: the second condition's validation shards.
        common = eval_common(s, second_cfg) | {"condition_key": keys[0]}
        a = snapshot(s, "compose_a", seed, s.steps)
        b = snapshot(s, "compose_b", seed, s.steps)
        settings = {
            "none (locked backbone)": ([a], [0.0], [keys[0]]),
            f"{keys[0]} only": ([a], [1.0], [keys[0]]),
            f"{keys[1]} only": ([b], [1.0], [keys[1]]),
            f"{keys[0]} + {keys[1]}": ([a, b], [1.0, 1.0], list(keys)),
        }
        per[seed] = {"timing": timing, "settings": {}}
        for name, (cns, scales, ckeys) in settings.items():
            label = f"compose_seed{seed}_{re.sub(r'[^a-z0-9]+', '_', name.lower())}"
            generated = evaluate(
                s,
                label,
                cns,
                control_scales=scales,
                control_keys=ckeys,
                no_prompt=no_prompt,
                **common,
            )
            rescored = evaluate(
                s,
                label + f"_{keys[1]}",
                [],
                images=Path(generated["out"]) / "images",
                **(common | {"condition_key": keys[1]}),
            )
            per[seed]["settings"][name] = {
                keys[0]: fidelity_of(generated),
                keys[1]: fidelity_of(rescored),
            }
            if seed == s.seeds[0]:
                shown[name] = generated
    first = per[s.seeds[0]]["settings"]
    names = list(first)
    keys = list(first[names[0]])

    def values(name: str, key: str) -> list[float]:
        return [per[x]["settings"][name][key] for x in s.seeds]

    rows = [[name, *[fmt(values(name, k)) for k in keys]] for name in names]
    text = (
        table(["ControlNets", f"{keys[0]} fidelity", f"{keys[1]} fidelity"], rows)
        + f"\n\n(prompts: {'empty (evaluate --no-prompt)' if no_prompt else 'the samples own'})"
    )
    figure = stack(
        [
            bar_chart(
                keys,
                {name: [mean_spread(values(name, k)) for k in keys] for name in names},
                "each condition scored by its own fidelity",
            ),
            image_strip(list(shown.items()), conditions_from=shown[names[-1]], extra_key=keys[1]),
        ]
    )
    return {"runs": per, "prompt": s.compose_prompt}, text, figure


CLAIM_FUNCTIONS: dict[str, Callable[[Settings], tuple[dict[str, Any], str, Image.Image]]] = {
    "zero_conv": claim_zero_conv,
    "ucg": claim_ucg,
    "transfer": claim_transfer,
    "compose": claim_compose,
}


# ------------------------------------------------------------------------------- figures
FONT = ImageFont.load_default()
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
WIDTH = 900


def _frame(title: str, height: int = 300) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill="black", font=FONT)
    return image, draw


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: float) -> None:
    x0, y0, x1, y1 = box
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(5):
        value = top * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        draw.text((4, y - 6), f"{value:.2f}", fill="black", font=FONT)


def bar_chart(
    groups: Sequence[str], series: dict[str, Sequence[tuple[float, float]]], title: str
) -> Image.Image:
    """Grouped bars (mean) with error bars (spread over seeds)."""
    image, draw = _frame(title)
    box = (60, 30, WIDTH - 160, 270)
    values = [m + (e if not math.isnan(e) else 0) for v in series.values() for m, e in v]
    top = max([v for v in values if not math.isnan(v)] + [1e-6]) * 1.1
    _axes(draw, box, top)
    x0, y0, x1, y1 = box
    group_w = (x1 - x0) / max(1, len(groups))
    bar_w = group_w * 0.8 / max(1, len(series))
    for g, name in enumerate(groups):
        draw.text((x0 + g * group_w + 4, y1 + 6), name[:40], fill="black", font=FONT)
        for i, vals in enumerate(series.values()):
            mean, spread = vals[g]
            if math.isnan(mean):
                continue
            left = x0 + g * group_w + group_w * 0.1 + i * bar_w
            top_y = y1 - (y1 - y0) * mean / top
            draw.rectangle([left, top_y, left + bar_w - 2, y1], fill=COLOURS[i % len(COLOURS)])
            if spread and not math.isnan(spread):
                cx = left + bar_w / 2
                hi = y1 - (y1 - y0) * (mean + spread) / top
                lo = y1 - (y1 - y0) * max(0.0, mean - spread) / top
                draw.line([(cx, hi), (cx, lo)], fill="black")
    _legend(draw, list(series))
    return image


def line_chart(series: dict[str, tuple[list[int], list[float]]], title: str, xlabel: str):
    image, draw = _frame(title)
    box = (60, 30, WIDTH - 160, 270)
    x0, y0, x1, y1 = box
    xs = [x for v in series.values() for x in v[0]]
    ys = [y for v in series.values() for y in v[1]]
    if not xs:
        return image
    top = max(ys + [1e-6]) * 1.1
    right = max(xs) or 1
    _axes(draw, box, top)
    draw.text((x1 - 40, y1 + 6), f"{xlabel} {right}", fill="black", font=FONT)
    for i, (steps, values) in enumerate(series.values()):
        points = [
            (x0 + (x1 - x0) * x / right, y1 - (y1 - y0) * y / top)
            for x, y in zip(steps, values, strict=True)
        ]
        if len(points) > 1:
            draw.line(points, fill=COLOURS[i % len(COLOURS)], width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[i % len(COLOURS)])
    _legend(draw, list(series))
    return image


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str]) -> None:
    for i, name in enumerate(names):
        y = 40 + 16 * i
        draw.rectangle([WIDTH - 150, y, WIDTH - 140, y + 10], fill=COLOURS[i % len(COLOURS)])
        draw.text((WIDTH - 135, y - 1), name[:22], fill="black", font=FONT)


def image_strip(
    rows: Sequence[tuple[str, dict[str, Any]]],
    conditions_from: dict[str, Any] | None = None,
    extra_key: str | None = None,
    n: int = 8,
    tile: int = 64,
) -> Image.Image:
    """Rows of the first ``n`` evaluated samples of each report (enlarged to ``tile`` px), with
    the conditions (and the targets) of ``conditions_from`` above them when given."""
    label_w = 220
    first = rows[0][1]
    keys = [r["key"] for r in first["samples"]][:n]
    lines: list[tuple[str, list[Image.Image]]] = []
    if conditions_from is not None:
        lines += _condition_rows(conditions_from, keys, extra_key)
    for label, report in rows:
        folder = Path(report["out"]) / "images"
        lines.append((label, [Image.open(folder / f"{k}.png").convert("RGB") for k in keys]))
    image = Image.new("RGB", (label_w + n * (tile + 4), len(lines) * (tile + 4) + 4), "white")
    draw = ImageDraw.Draw(image)
    for r, (label, tiles) in enumerate(lines):
        y = 4 + r * (tile + 4)
        draw.text((6, y + tile // 2 - 6), label[:34], fill="black", font=FONT)
        for c, t in enumerate(tiles):
            method = Image.NEAREST if t.width <= tile else Image.LANCZOS  # toy: enlarge
            image.paste(t.resize((tile, tile), method), (label_w + c * (tile + 4), y))
    return image


def _condition_rows(
    report: dict[str, Any], keys: Sequence[str], extra_key: str | None
) -> list[tuple[str, list[Image.Image]]]:
    """The conditions and targets of ``keys`` read from the report's validation shards."""
    from cn_lightning.data import ShardDataModule

    settings = report["settings"]
    wanted = [settings["condition_key"]] + ([extra_key] if extra_key else [])
    out = []
    for key in wanted:
        dm = ShardDataModule(
            train_shards=settings["val_shards"],
            val_shards=settings["val_shards"],
            condition_key=key,
            resolution=settings["resolution"],
            batch_size=16,
            num_workers=0,
        )
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for batch in dm.build_val_dataset(0, 1):
            for i, k in enumerate(batch["key"]):
                cond = batch["condition"][i].permute(1, 2, 0).numpy()
                target = ((batch["image"][i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
                found[k] = (cond, target)
            if all(k in found for k in keys):
                break
        out.append((f"condition: {key}", [_pil(found[k][0]) for k in keys]))
        if key == wanted[-1]:
            out.append(("target", [_pil(found[k][1]) for k in keys]))
    return out


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))


def stack(parts: Sequence[Image.Image]) -> Image.Image:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts) + 8 * len(parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height + 8
    return out


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python benchmarks/paper_claims.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--claim", nargs="+", choices=[*CLAIMS, "all"], required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--steps",
        type=int,
        default=1500,
        help="optimizer steps of every training run (1500, the quickstart's)",
    )
    p.add_argument(
        "--early-steps",
        type=int,
        nargs="*",
        default=[10, 50, 150],
        help="zero_conv: also measure after these steps (default 10 50 150)",
    )
    p.add_argument("--work-dir", type=Path, default=Path("outputs/paper_claims"))
    p.add_argument(
        "--first-train-args",
        nargs="+",
        default=["data=xline"],
        help="compose: Hydra overrides of the first condition's runs (default: data=xline)",
    )
    p.add_argument(
        "--second-train-args",
        nargs="+",
        default=["data=yline"],
        help="compose: Hydra overrides of the second condition's runs (default: data=yline)",
    )
    p.add_argument(
        "--community",
        help="transfer: the fine-tuned base (default: the packaged toy community model)",
    )
    p.add_argument(
        "--community-palette",
        default="community",
        help="transfer: the palette the fine-tune draws in, for its colour accuracy (community)",
    )
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of evaluate (20)")
    p.add_argument(
        "--guidance",
        type=float,
        help="evaluate's guidance (default: the run's model.guidance_scale)",
    )
    p.add_argument("--num-samples", type=int, help="held-out samples per evaluation (default all)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--accelerator", default="auto", help="evaluate's accelerator (auto)")
    p.add_argument(
        "--compose-prompt",
        choices=("none", "prompt"),
        default="none",
        help="compose: generate without prompts (default) or with the samples' own",
    )
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every command")
    return p.parse_args(argv), train_args


def main(argv: Sequence[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    claims = list(CLAIMS) if "all" in args.claim else list(dict.fromkeys(args.claim))
    s = Settings(
        seeds=args.seeds,
        steps=args.steps,
        early_steps=args.early_steps,
        work_dir=args.work_dir.resolve(),
        train_args=train_args,
        first_train_args=args.first_train_args,
        second_train_args=args.second_train_args,
        community=args.community,
        community_palette=args.community_palette,
        eval_steps=args.eval_steps,
        guidance=args.guidance,
        num_samples=args.num_samples,
        eval_batch_size=args.eval_batch_size,
        accelerator=args.accelerator,
        compose_prompt=args.compose_prompt,
        env=run_env(args.threads),
    )
    s.work_dir.mkdir(parents=True, exist_ok=True)
    for claim in claims:
        start = time.perf_counter()
        s.spent = {"train": {}, "evaluate": {}}
        numbers, text, figure = CLAIM_FUNCTIONS[claim](s)
        compute = {kind: round(sum(v.values()), 1) for kind, v in s.spent.items()}
        text += (
            f"\n\nCompute: training {compute['train'] / 60:.1f} min "
            f"({len(s.spent['train'])} runs), evaluation {compute['evaluate'] / 60:.1f} min "
            f"({len(s.spent['evaluate'])} evaluations), cached ones included."
        )
        payload = {
            "claim": claim,
            "seeds": s.seeds,
            "steps": s.steps,
            "early_steps": s.stages,
            "train_args": s.train_args,
            "eval_steps": s.eval_steps,
            "wall_s": round(time.perf_counter() - start, 1),
            "compute_s": compute,
            "table": text,
            **numbers,
        }
        json_path = s.work_dir / f"paper_claims_{claim}.json"
        json_path.write_text(json.dumps(payload, indent=2, default=str))
        png_path = s.work_dir / f"paper_claims_{claim}.png"
        figure.save(png_path)
        print(f"\n## {claim} ({len(s.seeds)} seeds, {s.steps} steps)\n\n{text}\n")
        print(f"wrote {json_path} and {png_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
