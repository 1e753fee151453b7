"""Check shards: every sample complete and decodable; print counts; save a contact sheet.

    python -m data_prep.inspect_shards data/circles     # a folder, brace pattern or list
    python -m data_prep.inspect_shards "data/x-{000000..000009}.tar" --condition canny --sheet s.png

Exit status 1 if any sample or shard has a problem (usable in CI and after SLURM array jobs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cn_lightning.data.format import (
    IMAGE_EXTS,
    LATENT_EXT,
    decode_image,
    decode_npy,
    expand_shard_urls,
)
from cn_lightning.data.stream import SkipCounter, iter_tar
from data_prep.common import die

_COND_EXTS = ("png", "jpg", "webp")


@dataclass
class Report:
    """What inspection found."""

    samples: int = 0
    good: int = 0
    per_shard: dict[str, int] = field(default_factory=dict)
    conditions: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    problem_counts: Counter = field(default_factory=Counter)
    latents: int = 0
    sizes: Counter = field(default_factory=Counter)  # (height, width) of the good images
    examples: list[tuple[np.ndarray, list[np.ndarray], str]] = field(default_factory=list)

    def add_problem(self, reason: str, where: str) -> None:
        self.problem_counts[reason] += 1
        if len(self.problems) < 50:
            self.problems.append(f"{where}: {reason}")


def condition_names(sample: dict) -> list[str]:
    """Condition members of a sample: ``<name>.png`` (two-part extensions, not the image)."""
    return sorted(
        k.rsplit(".", 1)[0]
        for k in sample
        if "." in k and k.rsplit(".", 1)[1] in _COND_EXTS and k != LATENT_EXT
    )


def check_sample(sample: dict, wanted: str | None, report: Report, keep: bool) -> None:
    """Validate one raw sample and record the outcome in ``report``."""
    where = f"{os.path.basename(str(sample['__url__']))}:{sample['__key__']}"
    report.samples += 1
    image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
    image = decode_image(sample[image_ext]) if image_ext else None
    if image is None:
        report.add_problem("missing image" if image_ext is None else "undecodable image", where)
        return
    if "txt" not in sample:
        report.add_problem("missing txt", where)
        return
    names = condition_names(sample)
    if wanted is not None and wanted not in names:
        report.add_problem(f"missing condition {wanted}", where)
        return
    if not names:
        report.add_problem("no condition image", where)
        return
    conds = []
    for name in names:
        ext = next(e for e in _COND_EXTS if f"{name}.{e}" in sample)
        cond = decode_image(sample[f"{name}.{ext}"])
        if cond is None or cond.shape[:2] != image.shape[:2]:
            report.add_problem(
                f"{name}: "
                + (
                    "undecodable"
                    if cond is None
                    else f"size {cond.shape[:2]} != image {image.shape[:2]}"
                ),
                where,
            )
            return
        report.conditions[name] += 1
        conds.append(cond)
    if LATENT_EXT in sample:
        try:
            if decode_npy(sample[LATENT_EXT]).ndim != 3:
                raise ValueError("latent is not (C,h,w)")
            report.latents += 1
        except Exception as err:
            report.add_problem(f"bad latent ({err})", where)
            return
    report.good += 1
    report.sizes[image.shape[:2]] += 1
    if keep:
        report.examples.append((image, conds, sample["txt"].decode("utf-8", "replace")))


def inspect_shards(
    urls: list[str], condition: str | None = None, num_examples: int = 8, progress: bool = True
) -> Report:
    """Read every sample of every shard and check it."""
    report = Report()
    for url in tqdm(urls, desc="inspect", unit="shard", disable=not progress):
        counter = SkipCounter()
        before = report.samples
        for sample in iter_tar(url, counter):
            check_sample(sample, condition, report, len(report.examples) < num_examples)
        report.per_shard[url] = report.samples - before
        for reason, n in counter.counts.items():
            report.add_problem(reason, url)
            report.problem_counts[reason] += n - 1
    return report


def describe_sizes(sizes: Counter) -> str:
    """One line on the good images' sizes: how many distinct, and the aspect ratios (width /
    height) found, which decide the aspect-ratio buckets they train in (data.buckets)."""
    if not sizes:
        return "image sizes: none"
    ratios = Counter()
    for (h, w), n in sizes.items():
        ratios[round(w / h, 2)] += n
    common = ", ".join(f"{r:g} x{n}" for r, n in ratios.most_common(5))
    return (
        f"image sizes: {len(sizes)} distinct; aspect ratios (w/h) {min(ratios):g} to "
        f"{max(ratios):g}, most common: {common}"
    )


def contact_sheet(examples, cell: int = 192) -> Image.Image:
    """One row per example: target | conditions..., prompt underneath (each image fitted into
    its cell, aspect ratio kept)."""
    cols = 1 + max(len(c) for _, c, _ in examples)
    text_h = 28
    sheet = Image.new("RGB", (cols * cell, len(examples) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (image, conds, prompt) in enumerate(examples):
        y = row * (cell + text_h)
        for col, arr in enumerate([image, *conds]):
            h, w = arr.shape[:2]
            fit = (max(1, round(w * cell / max(h, w))), max(1, round(h * cell / max(h, w))))
            x0, y0 = col * cell + (cell - fit[0]) // 2, y + (cell - fit[1]) // 2
            sheet.paste(Image.fromarray(arr).resize(fit), (x0, y0))
        draw.text((4, y + cell + 4), prompt[: cols * cell // 6], fill="black")
    return sheet


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.inspect_shards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("shards", nargs="+", help="folder, brace pattern, list or pipe: URL")
    parser.add_argument("--condition", default=None, help="require this condition member")
    parser.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    parser.add_argument("--num-examples", type=int, default=8)
    args = parser.parse_args(argv)
    urls = expand_shard_urls(args.shards)
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or len(missing) == len(urls):
        die(f"no shards found at {' '.join(args.shards)}")
    report = inspect_shards(urls, args.condition, args.num_examples)
    print(
        f"shards: {len(urls)}  samples: {report.samples}  good: {report.good}  "
        f"problems: {sum(report.problem_counts.values())}"
    )
    print(f"conditions: {dict(report.conditions)}  cached latents: {report.latents}")
    print(describe_sizes(report.sizes))
    counts = list(report.per_shard.values())
    if counts:
        print(
            f"samples per shard: min {min(counts)}  max {max(counts)}  "
            f"mean {sum(counts) / len(counts):.1f}"
        )
    for reason, n in report.problem_counts.items():
        print(f"  {reason}: {n}")
    for line in report.problems[:20]:
        print(f"  ! {line}")
    if args.sheet and report.examples:
        contact_sheet(report.examples).save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    raise SystemExit(1 if report.problem_counts else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
