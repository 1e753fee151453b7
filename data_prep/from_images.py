"""Captioned images → shards with condition images made by a registered extractor.

``--src`` may be
  * a folder of images with captions in ``<name>.txt`` beside each image (searched recursively);
  * a folder with a ``metadata.jsonl`` as diffusers' ImageFolder uses (``file_name`` plus a
    caption column, ``--caption-column``; an existing condition image can be taken from
    ``--condition-column`` instead of being extracted);
  * existing WebDataset shards, e.g. img2dataset output (``key.jpg``, ``key.txt``,
    ``key.json``): a ``.tar`` file, a brace pattern, or a folder of ``*.tar``.

The condition ``--condition NAME`` comes from ``cn_lightning.conditions`` (``canny`` built in;
``--extractor-module my.module`` imports more, ``--condition-arg k=v`` passes options such as
local weights). Extraction runs on the resized image, at training resolution.

    python -m data_prep.from_images --src photos/ --out data/canny --condition canny
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from cn_lightning.conditions import get_extractor, get_spec, import_extractor_modules
from cn_lightning.data.format import (
    IMAGE_EXTS,
    decode_image,
    encode_image,
    read_image_file,
    sanitize_key,
)
from cn_lightning.data.transforms import apply_resize_policy
from data_prep.common import (
    RejectedInput,
    SampleMaker,
    add_common_args,
    config_from_args,
    die,
    parse_options,
    print_summary,
    run_shards,
)

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_COLUMNS = ("text", "caption", "prompt")


# --------------------------------------------------------------------------- input listing
def list_folder(src: str) -> list[dict[str, Any]]:
    """Images under ``src`` (recursive, sorted) with the ``.txt`` beside each, if any."""
    items = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(FOLDER_IMAGE_EXTS):
                path = os.path.join(root, name)
                items.append(
                    {
                        "image": os.path.relpath(path, src),
                        "caption_file": os.path.relpath(os.path.splitext(path)[0] + ".txt", src),
                    }
                )
    return items


def list_metadata_jsonl(
    src: str, caption_column: str | None, condition_column: str | None
) -> list[dict[str, Any]]:
    """Entries of ``src/metadata.jsonl``; malformed lines become counted rejects."""
    items = []
    with open(os.path.join(src, "metadata.jsonl"), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                columns = [caption_column] if caption_column else CAPTION_COLUMNS
                caption = next((row[c] for c in columns if c in row), "")
                item = {"image": row["file_name"], "caption": str(caption)}
                if condition_column:
                    item["condition_file"] = row[condition_column]
                items.append(item)
            except (ValueError, KeyError, TypeError) as err:
                items.append({"error": f"metadata.jsonl line {lineno}: {err!r}"})
    return items


def tar_urls(src: str) -> list[str]:
    """Local tar shards named by ``src``: a file, a brace pattern or a folder of ``*.tar``."""
    if os.path.isdir(src):
        return sorted(glob.glob(os.path.join(src, "*.tar")))
    return [u for u in expand_urls(src) if os.path.isfile(u)]


def scan_tar(path: str) -> list[dict[str, Any]]:
    """One item per sample key: where each member's bytes lie in the tar, so workers can read
    any sample directly. A tar that breaks off keeps the samples before the damage and adds a
    reject item naming it."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    items: list[dict[str, Any]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is not None:
                    groups.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as err:
        items.append({"error": f"{path}: unreadable tar after {len(groups)} samples: {err}"})
    items[:0] = [{"tar": path, "key": k, "members": m} for k, m in groups.items()]
    return items


def list_inputs(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    """(mode, items) for ``--src``; a one-line error if there is nothing usable."""
    src = args.src
    if os.path.isdir(src):
        if os.path.isfile(os.path.join(src, "metadata.jsonl")):
            return "metadata_jsonl", list_metadata_jsonl(
                src, args.caption_column, args.condition_column
            )
        items = list_folder(src)
        if items:
            return "folder", items
    urls = tar_urls(src)
    if not urls:
        die(f"--src {src}: no images, metadata.jsonl or .tar shards found")
    return "shards", [item for url in urls for item in scan_tar(url)]


# --------------------------------------------------------------------------- sample making
@dataclass
class FromImagesMaker(SampleMaker):
    src: str
    mode: str
    condition: str
    condition_options: dict[str, Any]
    extractor_modules: list[str]
    resolution: int | None
    resize: str
    image_format: str
    quality: int
    _extract: Any = field(default=None, repr=False)

    def setup(self) -> None:
        import_extractor_modules(self.extractor_modules)
        self._extract = get_extractor(self.condition, **self.condition_options)

    def describe(self, item: dict[str, Any]) -> str:
        if "error" in item:
            return item["error"]
        return f"{item['tar']}:{item['key']}" if "tar" in item else item["image"]

    def _load_tar_item(self, item) -> tuple[np.ndarray | None, str, dict, str]:
        members = item["members"]
        image_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if image_ext is None:
            raise RejectedInput("missing_image", f"members: {sorted(members)}")
        with open(item["tar"], "rb") as f:

            def read(ext: str) -> bytes:
                offset, size = members[ext]
                f.seek(offset)
                return f.read(size)

            image = decode_image(read(image_ext))
            caption = read("txt").decode("utf-8", "replace").strip() if "txt" in members else ""
            try:
                source_meta = json.loads(read("json")) if "json" in members else {}
            except ValueError:
                source_meta = {}
        return image, caption, source_meta, sanitize_key(item["key"])

    def _load_file_item(self, item, index_key: str) -> tuple[np.ndarray | None, str, dict, str]:
        image = read_image_file(os.path.join(self.src, item["image"]))
        caption = item.get("caption")
        if caption is None:
            try:
                with open(os.path.join(self.src, item["caption_file"]), encoding="utf-8") as f:
                    caption = f.read().strip()
            except OSError:
                caption = ""  # uncaptioned images still teach the condition (empty prompt)
        return image, caption, {"path": item["image"]}, index_key

    def make(self, item: dict[str, Any]) -> dict[str, bytes | str]:
        if "error" in item:
            raise RejectedInput("unreadable_input", item["error"])
        if "tar" in item:
            image, caption, source_meta, key = self._load_tar_item(item)
        else:
            key = sanitize_key(os.path.splitext(item["image"])[0])
            image, caption, source_meta, key = self._load_file_item(item, key)
        if image is None:
            raise RejectedInput("unreadable_image", self.describe(item))
        original = list(image.shape[:2])
        image = apply_resize_policy(image, self.resolution, self.resize)
        condition = self._condition(item, image, original)
        meta = {
            "source": "from_images",
            "input": self.describe(item),
            "original_size": original,
            "condition": self.condition,
            "source_meta": source_meta,
        }
        return {
            "__key__": key,
            self.image_format: encode_image(image, self.image_format, self.quality),
            f"{self.condition}.png": encode_image(condition, "png"),
            "txt": caption,
            "json": json.dumps(meta),
        }

    def _condition(self, item, image: np.ndarray, original: list[int]) -> np.ndarray:
        """Given condition file (``--condition-column``) or the extractor's output."""
        if "condition_file" in item:
            condition = read_image_file(os.path.join(self.src, item["condition_file"]))
            if condition is None:
                raise RejectedInput("unreadable_condition", item["condition_file"])
            if list(condition.shape[:2]) != original:
                raise RejectedInput(
                    "size_mismatch",
                    f"{item['condition_file']}: {condition.shape[:2]} vs image {original}",
                )
            discrete = get_spec(self.condition).discrete if self.condition else False
            return apply_resize_policy(condition, self.resolution, self.resize, discrete)
        condition = np.asarray(self._extract(image))
        if condition.shape[:2] != image.shape[:2] or condition.dtype != np.uint8:
            raise RejectedInput(
                "extractor_output",
                f"{self.condition} returned "
                f"{condition.dtype}{condition.shape} for image {image.shape}",
            )
        return condition


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.from_images",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_common_args(parser, prefix="data")
    parser.add_argument(
        "--condition",
        default="canny",
        help="extractor name from cn_lightning.conditions (default: canny)",
    )
    parser.add_argument(
        "--condition-arg",
        action="append",
        metavar="NAME=VALUE",
        help="extractor option, repeatable (e.g. low_threshold=50, weights=/models/hed.pth)",
    )
    parser.add_argument(
        "--extractor-module",
        action="append",
        default=[],
        help="module to import first; it registers more extractors",
    )
    parser.add_argument(
        "--caption-column",
        default=None,
        help="metadata.jsonl caption column (default: text, caption or prompt)",
    )
    parser.add_argument(
        "--condition-column",
        default=None,
        help="metadata.jsonl column naming an existing condition image",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.path.exists(args.src) and not tar_urls(args.src):
        die(f"--src {args.src}: no such file, folder or shard pattern")
    try:
        import_extractor_modules(args.extractor_module)
        get_spec(args.condition)
    except (ImportError, KeyError) as err:
        die(str(err).strip("'\""))
    mode, items = list_inputs(args)
    options = parse_options(args.condition_arg)
    cfg = config_from_args(
        args,
        "from_images",
        image_format="jpg",
        condition_types=[args.condition],
        settings={
            "src": os.path.abspath(args.src),
            "mode": mode,
            "condition": args.condition,
            "options": options,
        },
    )
    maker = FromImagesMaker(
        args.src,
        mode,
        args.condition,
        options,
        args.extractor_module,
        cfg.resolution,
        cfg.resize,
        cfg.image_format,
        cfg.quality,
    )
    print_summary(run_shards(items, maker, cfg), cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
