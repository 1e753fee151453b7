"""Synthetic fill50k-style toy data: white circle outline on black → filled circle.

Each sample: condition = a white circle outline on black; target = the circle filled with
colour A on background colour B; prompt = "<colour A> circle with <colour B> background".
Centres and radii are random and circles may cross the border. Sample ``i`` depends only on
``(seed, i)``, so the data are identical for any number of workers or parts.

    python -m data_prep.synthetic_circles --out data/circles --num-samples 50000 --size 512
    python -m data_prep.synthetic_circles --out data/fill50k_like --layout fill50k ...
    python -m data_prep.synthetic_circles --out data/compose --swatch ...  # + swatch, x/yline
    python -m data_prep.synthetic_circles --out data/community --palette community ...

``--swatch`` writes the composition world: the circle lies fully inside the image, and next to
the outline come ``<key>.swatch.png`` (an image filled with the circle's colour) and
``<key>.xline.png`` / ``<key>.yline.png`` (lines through its centre). ``--palette community``
draws the prompts' colour names in the toy community model's palette (a permutation of the
colours).

The generator itself lives in :mod:`cn_lightning.data.synthetic`.
"""

from __future__ import annotations

import argparse
import sys

from cn_lightning.data.synthetic import (
    PALETTES,
    CircleMaker,
    condition_types,
    world_settings,
    write_fill50k_layout,
)
from data_prep.common import (
    add_common_args,
    config_from_args,
    die,
    print_summary,
    run_shards,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic_circles", description=__doc__.split("\n\n")[0]
    )
    add_common_args(parser, prefix="circles", src_required=False, default_resolution=None)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="generated image size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--palette",
        choices=sorted(PALETTES),
        default="toy",
        help="which RGB each colour name is drawn in (default toy)",
    )
    parser.add_argument(
        "--swatch",
        action="store_true",
        help="the composition world: circles inside, plus <key>.swatch.png (the circle's colour), "
        "<key>.xline.png and <key>.yline.png (lines through its centre)",
    )
    parser.add_argument(
        "--layout",
        choices=("shards", "fill50k"),
        default="shards",
        help="write shards, or the original tutorial layout for data_prep.fill50k",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_samples < 1 or args.size < 8:
        die("--num-samples must be >= 1 and --size >= 8")
    if args.layout == "fill50k":
        if args.swatch or args.palette != "toy":
            die("--swatch and --palette write shards: leave out --layout fill50k")
        write_fill50k_layout(args.out, args.num_samples, args.size, args.seed)
        print(f"wrote {args.num_samples} samples in the fill50k layout to {args.out}")
        return
    cfg = config_from_args(
        args,
        "synthetic_circles",
        image_format="png",
        condition_types=condition_types(args.swatch),
        settings=world_settings(args.seed, args.size, args.palette, args.swatch),
    )
    maker = CircleMaker(
        args.size,
        args.seed,
        cfg.resolution,
        cfg.resize,
        cfg.image_format,
        cfg.quality,
        args.palette,
        args.swatch,
    )
    summary = run_shards(range(args.num_samples), maker, cfg)
    print_summary(summary, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
