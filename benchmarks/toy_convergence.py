"""The paper's Figure 4 at toy scale: the quickstart over several seeds, with numbers.

Runs ``python -m cn_lightning.train seed=S`` (the quickstart: a ControlNet on the packaged toy
backbone, synthetic circles, CPU) once per seed, reads each run's ``convergence.json`` and prints
a Markdown table: the detected sudden-convergence step, the fidelity series of the sample grid
(circle IoU of the samples vs. their outline, 4 held-out conditions) at step 0, before the jump
(mean of the points before the detected step) and after it (mean of the last three points), and
the wall time. Then ``cn_lightning.evaluate`` scores every held-out validation condition (64) with
the final ControlNet and with the locked backbone alone (control scale 0, the same seeds).

    python benchmarks/toy_convergence.py --seeds 0 1 2 --out /tmp/toy_convergence [overrides ...]

Extra arguments are passed to every run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    """Train the quickstart with ``seed`` into ``out/seed_S``; return its convergence summary."""
    run_dir = out / f"seed_{seed}"
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cn_lightning.train",
            f"seed={seed}",
            f"hydra.run.dir={run_dir}",
            "trainer.enable_progress_bar=false",
            *overrides,
        ],
        check=True,
        env=dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline")),
    )
    wall = time.perf_counter() - start
    report = json.loads((run_dir / "convergence.json").read_text())
    row = summarise(seed, report, wall)
    row["held_out_fidelity"] = evaluate(run_dir, run_dir / "eval_controlnet", control_scale=1.0)
    return row


def run_config(run_dir: Path) -> dict:
    """The run's backbone, validation shards and sampling settings (its resolved config)."""
    from omegaconf import OmegaConf

    from cn_lightning.config import register_resolvers

    register_resolvers()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return {
        "base": cfg.model.pretrained_model_path,
        "val_shards": cfg.data.val_shards,
        "condition_key": cfg.data.condition_key,
        "resolution": cfg.data.resolution,
        "steps": cfg.model.sample_steps,
        "guidance": cfg.model.guidance_scale,
    }


def evaluate(run_dir: Path, out: Path, control_scale: float) -> float:
    """Mean fidelity over the run's validation shards (``control_scale`` 0: the locked backbone)."""
    c = run_config(run_dir)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cn_lightning.evaluate",
            "--val-shards",
            str(c["val_shards"]),
            "--condition-key",
            c["condition_key"],
            "--resolution",
            str(c["resolution"]),
            "--base",
            str(c["base"]),
            "--controlnet",
            str(run_dir / "controlnet"),
            "--steps",
            str(c["steps"]),
            "--guidance",
            str(c["guidance"]),
            "--control-scale",
            str(control_scale),
            "--batch-size",
            "16",
            "--out",
            str(out),
        ],
        check=True,
    )
    return json.loads((out / "report.json").read_text())["metrics"]["fidelity"]


def summarise(seed: int, report: dict, wall_s: float) -> dict:
    """Convergence step and fidelity before/after from one run's ``convergence.json``."""
    metric = report["metric"]
    # A round where the metric was undefined for every sample holds None: a missing point.
    series = [(p["step"], p[metric]) for p in report["series"] if p.get(metric) is not None]
    step = report["sudden_convergence_step"]
    before = [v for s, v in series if step is None or s < step]
    tail = [v for _, v in series[-3:]]
    return {
        "seed": seed,
        "sudden_convergence_step": step,
        "fidelity_start": series[0][1],
        "fidelity_before": sum(before) / len(before) if before else float("nan"),
        "fidelity_after": sum(tail) / len(tail),
        "final_step": series[-1][0],
        "wall_s": round(wall_s, 1),
    }


def figure(run_dir: Path, step: int | None, out_png: Path) -> Path:
    """The run's grids at step 0, just before the jump, at the jump and at the end, side by side."""
    import numpy as np
    from PIL import Image

    pngs = sorted((run_dir / "samples").glob("step_*.png"))
    steps = [int(p.stem.split("_")[1]) for p in pngs]
    chosen = [0, steps[-1]]
    if step is not None:
        chosen[1:1] = [max(s for s in steps if s < step), step]
    grids = [
        np.asarray(Image.open(run_dir / "samples" / f"step_{s:07d}.png").convert("RGB"))
        for s in chosen
    ]
    height = max(g.shape[0] for g in grids)
    gap = np.full((height, 8, 3), 255, np.uint8)
    parts = []
    for g in grids:
        parts += [g, gap]
    Image.fromarray(np.concatenate(parts[:-1], axis=1)).save(out_png)
    print(f"figure: grids at steps {chosen} -> {out_png}")
    return out_png


def markdown(rows: list[dict], baseline: float) -> str:
    lines = [
        "| seed | sudden-convergence step | grid fidelity at step 0 | before the jump (mean) "
        "| after (last 3 points) | held-out fidelity, 64 conditions | steps | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = r["sudden_convergence_step"] if r["sudden_convergence_step"] is not None else "none"
        lines.append(
            f"| {r['seed']} | {step} | {r['fidelity_start']:.3f} | {r['fidelity_before']:.3f} "
            f"| {r['fidelity_after']:.3f} | {r['held_out_fidelity']:.3f} | {r['final_step']} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    lines.append(
        f"\nLocked backbone alone (control scale 0) on the same 64 conditions: {baseline:.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_convergence"))
    parser.add_argument(
        "--figure",
        type=Path,
        help="also write the first seed's grids before/at/after the jump here",
    )
    args, overrides = parser.parse_known_args(argv)
    rows = [run_seed(seed, args.out, overrides) for seed in args.seeds]
    first = args.out / f"seed_{args.seeds[0]}"
    baseline = evaluate(first, args.out / "eval_locked", control_scale=0.0)
    (args.out / "summary.json").write_text(
        json.dumps({"runs": rows, "locked_baseline": baseline}, indent=2)
    )
    print(markdown(rows, baseline))
    if args.figure:
        figure(first, rows[0]["sudden_convergence_step"], args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
