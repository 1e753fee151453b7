"""ADE20K scene parsing → shards with the colour-coded ``seg.png`` ControlNet's seg model expects.

Input (``--src``): ``ADEChallengeData2016`` with ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` (class indices, 0 = other, 1..150 = classes).
``seg.png`` draws class k with the standard 150-class ADE20K palette (unlabelled pixels black).
Prompts come from ``--captions`` (JSON lines ``{"file_name": "ADE_train_00000001.jpg",
"text": "..."}``, or a JSON object mapping file name or stem to caption), else from the names of
the largest classes present ("a scene with wall, floor, bed").

    python -m data_prep.ade20k --src ADEChallengeData2016 --out data/ade20k --split training
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import cv2

from cn_lightning.conditions.seg import ade_annotation_to_labels, class_names_present, colorize
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

CONDITION = "seg"
SPLITS = ("training", "validation")


def list_split(src: str, split: str) -> list[dict[str, str]]:
    """(image, annotation) relative paths of one split, sorted by name."""
    image_dir = os.path.join(src, "images", split)
    if not os.path.isdir(image_dir):
        die(f"--src {src}: no images/{split}/ folder (expected ADEChallengeData2016 layout)")
    items = []
    for name in sorted(os.listdir(image_dir)):
        if name.lower().endswith((".jpg", ".jpeg", ".png")):
            stem = os.path.splitext(name)[0]
            items.append(
                {
                    "image": f"images/{split}/{name}",
                    "annotation": f"annotations/{split}/{stem}.png",
                    "split": split,
                }
            )
    return items


def load_captions(path: str | None) -> dict[str, str]:
    """Captions keyed by file stem, from JSON lines or one JSON object."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        die(f"--captions {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    captions: dict[str, str] = {}
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and not {"file_name", "key"} & set(obj):  # a mapping file
            return {os.path.splitext(os.path.basename(k))[0]: str(v) for k, v in obj.items()}
    except ValueError:
        pass
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("file_name") or row["key"]
            captions[os.path.splitext(os.path.basename(name))[0]] = str(
                row.get("text", row.get("caption", ""))
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            die(f"--captions {path}: line {lineno} is not a JSON object with file_name and text")
    return captions


def prompt_from_classes(names: list[str]) -> str:
    """'a scene with wall, floor and bed' from the largest classes present."""
    if not names:
        return "a scene"
    if len(names) == 1:
        return f"a scene with {names[0]}"
    return f"a scene with {', '.join(names[:-1])} and {names[-1]}"


@dataclass
class ADE20KMaker(SampleMaker):
    src: str
    captions: dict[str, str]
    resolution: int | None
    resize: str
    image_format: str
    quality: int

    def describe(self, item: dict[str, str]) -> str:
        return item["image"]

    def make(self, item: dict[str, str]) -> dict[str, bytes | str]:
        image = read_image_file(os.path.join(self.src, item["image"]))
        if image is None:
            raise RejectedInput("unreadable_image", item["image"])
        annotation = cv2.imread(os.path.join(self.src, item["annotation"]), cv2.IMREAD_UNCHANGED)
        if annotation is None:
            raise RejectedInput("unreadable_annotation", item["annotation"])
        if annotation.ndim == 3:  # a palette PNG saved as RGB: class index is in every channel
            annotation = annotation[:, :, 0]
        if annotation.shape[:2] != image.shape[:2]:
            raise RejectedInput("size_mismatch", f"{annotation.shape[:2]} vs {image.shape[:2]}")
        original = list(image.shape[:2])
        image = apply_resize_policy(image, self.resolution, self.resize)
        # Nearest-neighbour on the class indices: no invented classes at region borders.
        labels = ade_annotation_to_labels(
            apply_resize_policy(annotation, self.resolution, self.resize, discrete=True)
        )
        stem = os.path.splitext(os.path.basename(item["image"]))[0]
        names = class_names_present(labels)
        prompt = self.captions.get(stem) or prompt_from_classes(names)
        meta = {
            "source": "ade20k",
            "split": item["split"],
            "image_path": item["image"],
            "original_size": original,
            "condition": CONDITION,
            "classes": names,
            "caption_source": "captions" if stem in self.captions else "class_names",
        }
        return {
            "__key__": sanitize_key(stem),
            self.image_format: encode_image(image, self.image_format, self.quality),
            f"{CONDITION}.png": encode_image(colorize(labels), "png"),
            "txt": prompt,
            "json": json.dumps(meta),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.ade20k", description=__doc__.split("\n\n")[0]
    )
    add_common_args(parser, prefix="ade20k")
    parser.add_argument("--split", choices=(*SPLITS, "all"), default="training")
    parser.add_argument("--captions", default=None, help="optional captions file")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.src):
        die(f"--src {args.src}: no such directory")
    splits = SPLITS if args.split == "all" else (args.split,)
    items = [item for split in splits for item in list_split(args.src, split)]
    if not items:
        die(f"--src {args.src}: no images in {', '.join(splits)}")
    cfg = config_from_args(
        args,
        "ade20k",
        image_format="jpg",
        condition_types=[CONDITION],
        settings={"src": os.path.abspath(args.src), "split": args.split, "captions": args.captions},
    )
    maker = ADE20KMaker(
        args.src,
        load_captions(args.captions),
        cfg.resolution,
        cfg.resize,
        cfg.image_format,
        cfg.quality,
    )
    print_summary(run_shards(items, maker, cfg), cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
