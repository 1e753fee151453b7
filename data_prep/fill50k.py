"""The original ControlNet tutorial layout → shards.

Input (``--src``): ``prompt.json`` (JSON lines ``{"source": "source/0.png", "target":
"target/0.png", "prompt": "..."}``), ``source/`` (circle outlines) and ``target/``.
Output: shards with ``<key>.png`` target, ``<key>.outline.png`` condition, ``<key>.txt``.

    python -m data_prep.fill50k --src training/fill50k --out data/fill50k_shards
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from cn_lightning.conditions import outline as binarise_outline
from cn_lightning.data.format import encode_image, read_image_file, sanitize_key
from cn_lightning.data.transforms import apply_resize_policy
from data_prep.common import (
    RejectedInput,
    SampleMaker,
    add_common_args,
    config_from_args,
    die,
    print_summary,
    run_shards,
)

CONDITION = "outline"


def read_prompt_file(src: str) -> list[dict[str, str]]:
    """The entries of ``src/prompt.json``; malformed lines are kept as rejects (item with
    ``error``) so they are counted and named in the manifest."""
    path = os.path.join(src, "prompt.json")
    if not os.path.isfile(path):
        die(f"--src {src}: no prompt.json (expected the ControlNet tutorial layout)")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append(
                    {
                        "source": entry["source"],
                        "target": entry["target"],
                        "prompt": entry.get("prompt", ""),
                        "line": lineno,
                    }
                )
            except (ValueError, KeyError, TypeError) as err:
                entries.append({"error": f"prompt.json line {lineno}: {err}", "line": lineno})
    return entries


@dataclass
class Fill50kMaker(SampleMaker):
    src: str
    resolution: int | None
    resize: str
    image_format: str
    quality: int

    def describe(self, item: dict) -> str:
        return item.get("target") or item.get("error", "?")

    def make(self, item: dict) -> dict[str, bytes | str]:
        if "error" in item:
            raise RejectedInput("bad_prompt_line", item["error"])
        source = read_image_file(os.path.join(self.src, item["source"]))
        target = read_image_file(os.path.join(self.src, item["target"]))
        if source is None or target is None:
            which = item["source"] if source is None else item["target"]
            raise RejectedInput("unreadable_image", which)
        if source.shape[:2] != target.shape[:2]:
            raise RejectedInput("size_mismatch", f"{source.shape[:2]} vs {target.shape[:2]}")
        original = list(target.shape[:2])
        target = apply_resize_policy(target, self.resolution, self.resize)
        condition = binarise_outline(apply_resize_policy(source, self.resolution, self.resize))
        key = sanitize_key(os.path.splitext(item["target"])[0].replace("target/", ""))
        meta = {
            "source": "fill50k",
            "target_path": item["target"],
            "source_path": item["source"],
            "original_size": original,
            "condition": CONDITION,
        }
        return {
            "__key__": key,
            self.image_format: encode_image(target, self.image_format, self.quality),
            f"{CONDITION}.png": encode_image(condition, "png"),
            "txt": item["prompt"],
            "json": json.dumps(meta),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.fill50k", description=__doc__.split("\n\n")[0]
    )
    add_common_args(parser, prefix="fill50k")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.src):
        die(f"--src {args.src}: no such directory")
    items = read_prompt_file(args.src)
    if not items:
        die(f"--src {args.src}: prompt.json has no entries")
    cfg = config_from_args(
        args,
        "fill50k",
        image_format="png",
        condition_types=[CONDITION],
        settings={"src": os.path.abspath(args.src)},
    )
    maker = Fill50kMaker(args.src, cfg.resolution, cfg.resize, cfg.image_format, cfg.quality)
    print_summary(run_shards(items, maker, cfg), cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
