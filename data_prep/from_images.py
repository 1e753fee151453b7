"""Captioned images → shards with condition images made by a registered extractor.

``--src`` may be
  * a folder of images with captions in ``<name>.txt`` beside each image (searched recursively);
  * a folder with a ``metadata.jsonl`` as diffusers' ImageFolder uses (``file_name`` plus a
    caption column, ``--caption-column``; an existing condition image can be taken from
    ``--condition-column`` instead of being extracted);
  * existing WebDataset shards, e.g. img2dataset output (``key.jpg``, ``key.txt``,
    ``key.json``): a ``.tar`` file, a brace pattern, or a folder of ``*.tar``.

The condition ``--condition NAME`` comes from ``cn_lightning.conditions``: canny, hed,
softedge, scribble, lineart, mlsd, depth, normal, openpose, seg (``--extractor-module my.module``
imports more, ``--condition-arg k=v`` passes other options such as thresholds). Model-based
extractors load local ``--weights`` only (docs/data.md lists where each model comes from) and
run ``--batch-size`` images per forward pass on ``--device`` (the GPU when there is one).
Extraction runs on the resized image, at training resolution.

    python -m data_prep.from_images --src photos/ --out data/canny --condition canny
    python -m data_prep.from_images --src photos/ --out data/depth --condition depth \
        --weights /models/Depth-Anything-V2-Small-hf --device cuda --batch-size 32 --workers 4
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

from cn_lightning.conditions import (
    extract_batch,
    get_extractor,
    get_spec,
    import_extractor_modules,
    needs_weights,
)
from cn_lightning.data.format import (
    IMAGE_EXTS,
    decode_image,
    encode_image,
    read_image_file,
    sanitize_key,
)
from cn_lightning.data.transforms import apply_resize_policy
from cn_lightning.errors import first_line
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
    batch_size: int = 1
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
        return self._finish(self._prepare(item))

    def make_many(self, items) -> list[dict[str, bytes | str] | Exception]:
        """Read and resize every item, extract the conditions of the batch at once (one forward
        pass per image size on the extractor's device), then encode."""
        prepared: list[dict[str, Any] | Exception] = []
        for item in items:
            try:
                prepared.append(self._prepare(item))
            except Exception as err:  # noqa: BLE001 - a reject, counted by the shard writer
                prepared.append(err)
        todo = [p for p in prepared if isinstance(p, dict) and p["condition"] is None]
        if todo:
            maps = extract_batch(self._extract, [p["image"] for p in todo])
            for p, condition in zip(todo, maps, strict=True):
                p["condition"] = np.asarray(condition)
        out: list[dict[str, bytes | str] | Exception] = []
        for p in prepared:
            try:
                out.append(p if isinstance(p, Exception) else self._finish(p))
            except Exception as err:  # noqa: BLE001
                out.append(err)
        return out

    def _prepare(self, item: dict[str, Any]) -> dict[str, Any]:
        """The resized image, caption, metadata and given condition (or None: to extract)."""
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
        condition = self._given_condition(item, original)
        return {
            "item": item,
            "key": key,
            "image": image,
            "caption": caption,
            "source_meta": source_meta,
            "original": original,
            "condition": condition,
        }

    def _finish(self, p: dict[str, Any]) -> dict[str, bytes | str]:
        item, key, image, caption = p["item"], p["key"], p["image"], p["caption"]
        source_meta, original = p["source_meta"], p["original"]
        condition = p["condition"]
        if condition is None:
            condition = np.asarray(self._extract(image))
        self._check_condition(condition, image)
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

    def _given_condition(self, item, original: list[int]) -> np.ndarray | None:
        """The condition file of ``--condition-column``, resized; None: extract it."""
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
        return None

    def _check_condition(self, condition: np.ndarray, image: np.ndarray) -> None:
        if condition.shape[:2] != image.shape[:2] or condition.dtype != np.uint8:
            raise RejectedInput(
                "extractor_output",
                f"{self.condition} returned "
                f"{condition.dtype}{condition.shape} for image {image.shape}",
            )


def check_extractor(name: str, options: dict[str, Any]) -> None:
    """Build the extractor once, on the CPU, before any worker starts: missing or wrong
    weights are one line here, not a failure in every worker."""
    try:
        get_extractor(name, **{**options, "device": "cpu"})
    except Exception as err:  # noqa: BLE001 - any failure to load is the user's input
        die(f"--condition {name}: {first_line(err)}")


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
        "--weights",
        default=None,
        metavar="PATH",
        help="local weights of a model-based extractor (file or folder; docs/data.md)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where a model-based extractor runs: auto (GPU when present), cpu, cuda, cuda:1",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images per extractor forward pass in each worker (default: %(default)s)",
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
    if args.batch_size < 1:
        die("--batch-size must be >= 1")
    if needs_weights(args.condition):
        options = {**options, "weights": args.weights or options.get("weights")}
        check_extractor(args.condition, options)
        options.update(device=args.device, batch_size=args.batch_size)
    elif args.weights:
        die(f"--weights: condition {args.condition!r} has no model (it needs no weights)")
    cfg = config_from_args(
        args,
        "from_images",
        image_format="jpg",
        condition_types=[args.condition],
        settings={
            "src": os.path.abspath(args.src),
            "mode": mode,
            "condition": args.condition,
            "options": {k: v for k, v in options.items() if k not in ("device", "batch_size")},
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
        args.batch_size if needs_weights(args.condition) else 1,
    )
    print_summary(run_shards(items, maker, cfg), cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
