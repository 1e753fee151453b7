"""The shard format (a public contract, see docs/data.md) and the helpers to read and write it.

A shard ``<prefix>-NNNNNN.tar`` groups members by key (WebDataset / img2dataset convention):
``<key>.jpg|png|webp`` target image, ``<key>.txt`` prompt, ``<key>.json`` metadata,
``<key>.<condition>.png`` condition images, optional ``<key>.latent.npy`` (float16 (C,h,w)),
``<key>.text.npy`` (float16 (tokens, hidden)) and ``<key>.pooled.npy`` (float16 (proj,), SDXL).
A ``manifest.json`` beside the shards records counts, conditions, resolution and rejects.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import webdataset as wds

from cn_lightning.atomic import atomic_file
from cn_lightning.errors import DataError, first_line

FORMAT_VERSION = "cn_lightning.shards/v1"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
# Cached text-encoder outputs (data_prep.cache_latents --text): float16 (tokens, hidden) hidden
# states, and for SDXL the float16 (proj,) pooled embedding. The empty prompt's are stored once
# per cache, in TEXT_CACHE_NAME beside the manifest.
TEXT_EXT = "text.npy"
POOLED_EXT = "pooled.npy"
TEXT_CACHE_NAME = "text_cache.safetensors"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_GLOB_CHARS = re.compile(r"[*?[]")
PROBE_SAMPLES = 8  # samples read from the start of the first shard by check_shards
PROBE_SHARDS = 3  # shards tried in turn when the first ones are empty tars


def shard_name(prefix: str, index: int) -> str:
    """``<prefix>-NNNNNN.tar``."""
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(directory: str, prefix: str, num_shards: int) -> str:
    """Brace pattern covering shards 0..num_shards-1, e.g. ``dir/circles-{000000..000007}.tar``."""
    if num_shards == 1:
        return os.path.join(directory, shard_name(prefix, 0))
    return os.path.join(directory, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots or slashes (the key ends at the first dot of a member)."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "sample"


def check_key(key: str) -> str:
    """Raise if ``key`` would be split wrongly by WebDataset (dots, slashes, spaces)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 RGB (H,W,3) or grey (H,W) → encoded bytes (png, jpg or webp)."""
    fmt = "jpg" if fmt == "jpeg" else fmt
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params: list[int] = []
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    elif fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fast; PNG stays lossless at any level
    ok, buf = cv2.imencode("." + fmt, image, params)
    if not ok:
        raise ValueError(f"could not encode image as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """Encoded bytes → uint8 RGB (H,W,3), or None if the bytes are not a decodable image."""
    if not data:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_file(path: str) -> np.ndarray | None:
    """Read an image file → uint8 RGB (H,W,3), None if unreadable."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read())
    except OSError:
        return None


def decode_prompt(raw: dict) -> str:
    """The prompt of a raw sample: ``<key>.txt`` as UTF-8, stripped ("" when missing)."""
    txt = raw.get("txt", b"")
    return txt.decode("utf-8", "replace").strip() if isinstance(txt, bytes) else str(txt).strip()


def encode_npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes (what ``<key>.latent.npy`` holds)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_npy`; refuses pickled objects."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shard_atomic(path: str, samples: Iterable[dict[str, bytes | str]]) -> tuple[int, int]:
    """Write samples (``{"__key__": k, "jpg": bytes, "txt": bytes, ...}``) to ``path``.

    Written atomically (:func:`cn_lightning.atomic.atomic_file`), so a killed run never leaves a
    half-written shard that a rerun would take as finished. Returns (num_samples, num_bytes).
    """
    count = 0
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
            for sample in samples:
                check_key(sample["__key__"])
                writer.write(
                    {
                        k: (v.encode() if isinstance(v, str) and k != "__key__" else v)
                        for k, v in sample.items()
                    }
                )
                count += 1
    return count, os.path.getsize(path)


@dataclass(frozen=True)
class TextCache:
    """The empty prompt's text-encoder outputs of a text cache (``TEXT_CACHE_NAME``), stored once
    for all its samples, and what made them (``fingerprint``: see
    ``cn_lightning.models.fingerprint``)."""

    path: str
    fingerprint: str
    kind: str  # "sd" (one text encoder) or "sdxl" (two, with a pooled embedding)
    model: str  # the model folder the cache was made from
    empty_hidden: np.ndarray  # (tokens, hidden)
    empty_pooled: np.ndarray | None  # (proj,), SDXL only

    @property
    def pooled(self) -> bool:
        """Whether the samples carry ``<key>.pooled.npy`` (SDXL)."""
        return self.empty_pooled is not None


def write_text_cache(
    path: str, meta: dict[str, str], hidden: np.ndarray, pooled: np.ndarray | None = None
) -> None:
    """Write the empty prompt's embeddings (float32) with ``meta`` (``fingerprint``, ``kind``,
    ``model``) as safetensors metadata, atomically."""
    from safetensors.numpy import save_file

    tensors = {"empty.hidden": np.ascontiguousarray(hidden, np.float32)}
    if pooled is not None:
        tensors["empty.pooled"] = np.ascontiguousarray(pooled, np.float32)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in meta.items()})


def read_text_cache(path: str) -> TextCache:
    """Read a text cache file; :class:`DataError` (one line) if it is missing or broken."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            hidden = f.get_tensor("empty.hidden")
            pooled = f.get_tensor("empty.pooled") if "empty.pooled" in names else None
        return TextCache(
            path=path,
            fingerprint=meta["fingerprint"],
            kind=meta.get("kind", "sdxl" if pooled is not None else "sd"),
            model=meta.get("model", "?"),
            empty_hidden=hidden,
            empty_pooled=pooled,
        )
    except Exception as err:
        detail = type(err).__name__ + (f": {first_line(err)}" if str(err).strip() else "")
        raise DataError(
            f"cannot read the text cache {path} ({detail}): rebuild it with "
            "data_prep.cache_latents --text, or set data.use_cached_text=false"
        ) from None


def read_manifest(directory: str) -> dict | None:
    """The manifest in ``directory``, or None if missing or unreadable."""
    try:
        with open(os.path.join(directory, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_remote_url(url: str) -> bool:
    """True for ``pipe:`` commands and URLs (``http://``, ``s3://``, ...): read, never stat'ed."""
    return url.startswith("pipe:") or "://" in url


def expand_shard_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs from a brace pattern (``a-{000000..000009}.tar``), a ``::``-separated string,
    a list of any of these, a local directory (its manifest's shards, else ``*.tar``), a local
    glob (``/data/a-*.tar``, sorted) or ``pipe:`` commands (passed through)."""
    return [url for _, urls in _expand_items(spec) for url in urls]


def _expand_items(spec) -> list[tuple[str, list[str]]]:
    """``(item, its urls)`` for every item of ``spec`` (see :func:`expand_shard_urls`)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[tuple[str, list[str]]] = []
    for item in specs:
        item = str(item)
        if not is_remote_url(item) and os.path.isdir(item):
            out.append((item, _shards_in_directory(item)))
            continue
        urls: list[str] = []
        for url in wds.shardlists.expand_urls(item):
            if not is_remote_url(url) and _GLOB_CHARS.search(url) and not os.path.exists(url):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
        out.append((item, urls))
    return out


def _shards_in_directory(directory: str) -> list[str]:
    manifest = read_manifest(directory)
    if manifest and manifest.get("shards"):
        return [os.path.join(directory, s["name"]) for s in manifest["shards"]]
    return sorted(glob.glob(os.path.join(directory, "*.tar")))


def manifest_num_samples(spec: str | list[str]) -> int | None:
    """Total sample count from the manifests of local shards in ``spec``, if all are known."""
    urls = expand_shard_urls(spec)
    dirs = {os.path.dirname(u) for u in urls}
    if any(u.startswith("pipe:") or "://" in u for u in urls):
        return None
    per_shard: dict[str, int] = {}
    for d in dirs:
        manifest = read_manifest(d)
        if not manifest:
            return None
        for s in manifest.get("shards", []):
            per_shard[os.path.join(d, s["name"])] = int(s["num_samples"])
    try:
        return sum(per_shard[u] for u in urls)
    except KeyError:
        return None


def tar_samples(stream, url: str) -> Iterator[dict[str, bytes | str]]:
    """The members of an open tar stream grouped into raw samples by key (WebDataset's
    convention): ``{"__key__", "__url__", ext: bytes}``, each yielded once it is complete. If the
    tar breaks off, the sample being read is not yielded and the error propagates."""
    from webdataset.tariterators import base_plus_ext

    current: dict[str, bytes | str] | None = None
    for name, data in tar_members(stream):
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        current[ext.lower()] = data
    if current is not None:
        yield current


_BLOCK = 512
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz
_REGULAR = (b"0", b"\0", b"7")
_META_NAME = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, skipped as it does


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order.

    A direct reader of ustar/GNU/pax headers: on small samples (the quickstart's 32 px images)
    ``tarfile``'s per-member work is half the cost of a batch, this reader's a tenth of it.
    Compressed tars go through ``tarfile``. Errors are ``tarfile``'s: ``ReadError`` for an empty
    stream, a header that is not a tar header (bad checksum) or data that breaks off.
    """
    head = stream.read(_BLOCK)
    if not head:
        raise tarfile.ReadError("empty file")
    if head.startswith(_COMPRESSED):
        yield from _tarfile_members(_Prepended(head, stream))
        return
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        if len(head) < _BLOCK:
            if not head:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise tarfile.ReadError("truncated header")
        if head == b"\0" * _BLOCK:
            return  # end of archive
        if _checksum(head) != _header_number(head[148:156]):
            raise tarfile.ReadError("invalid header")
        size = int(pax.get(b"size", 0)) or _header_number(head[124:136])
        data = stream.read(size) if size else b""
        padding = -size % _BLOCK
        if len(data) < size or (padding and len(stream.read(padding)) < padding):
            raise tarfile.ReadError("unexpected end of data")
        kind = head[156:157]
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0")
        elif kind == b"x":
            pax = _pax_records(data)
        elif kind in _REGULAR:
            name = pax.get(b"path") or long_name or _ustar_name(head)
            long_name, pax = None, {}
            text = name.decode("utf-8", "surrogateescape")
            if not _META_NAME.search(text):
                yield text, data
        else:  # directories, links, global pax headers: nothing to read
            long_name, pax = None, {}
        head = stream.read(_BLOCK)


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 0x20 + sum(header[156:])


def _header_number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 when the first byte has its top bit."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value if field[0] == 0x80 else value - 256 ** (len(field) - 1)
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError("invalid header") from None


def _ustar_name(header: bytes) -> bytes:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            return prefix + b"/" + name
    return name


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        length = int(data[pos : data.index(b" ", pos)])
        record = data[data.index(b" ", pos) + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key] = value
        pos += length
    return out


def _tarfile_members(stream) -> Iterator[tuple[str, bytes]]:
    from webdataset.tariterators import tar_file_iterator

    for member in tar_file_iterator(stream):
        yield member["fname"], member["data"]


class _Prepended:
    """A read-only stream: ``head`` and then what ``stream`` has left."""

    def __init__(self, head: bytes, stream) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        if len(out) < size:
            out += self._stream.read(size - len(out))
        return out


# ----------------------------------------------------------------------- checks before training
def read_first_samples(url: str, max_samples: int = 1) -> list[dict[str, bytes | str]]:
    """Up to ``max_samples`` raw samples (``{"__key__", "__url__", ext: bytes}``) from the start
    of one shard, local path or ``pipe:``/URL (opened with WebDataset's ``gopen``; a pipe is
    stopped once enough is read).

    Raises what opening or reading raises (not a tar, truncated, a command that failed) unless
    a whole sample was read before; an empty tar gives ``[]``.
    """
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    samples: list[dict[str, bytes | str]] = []
    try:
        for sample in tar_samples(stream, url):
            samples.append(sample)
            if len(samples) >= max_samples:
                break
    except Exception as err:
        if samples:
            return samples  # broke off later: the stream skips and counts that part
        status = _exit_status(stream)
        if status not in (None, 0):
            raise OSError(f"the command exited with status {status}") from err
        raise
    finally:
        _close_quietly(stream)
    return samples


def _exit_status(stream, timeout: float = 5.0) -> int | None:
    """Exit status of a ``pipe:`` stream's command (None: not a pipe, or still running)."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        return None


def _close_quietly(stream) -> None:
    proc = getattr(stream, "proc", None)  # webdataset's Pipe: stop the command, ignore its status
    if proc is not None and proc.poll() is None:
        proc.kill()
    try:
        stream.close()
    except Exception:
        pass


def condition_keys_of(sample: dict) -> list[str]:
    """The condition names of a raw sample: ``canny`` for ``<key>.canny.png`` and so on."""
    names = set()
    for member in sample:
        base, _, ext = member.rpartition(".")
        if base and ext in IMAGE_EXTS:
            names.add(base)
    return sorted(names)


def check_shards(
    spec,
    name: str,
    condition_key: str | None = None,
    need_latent: bool = False,
    need_text: bool = False,
) -> list[str]:
    """Check a shard spec before training and return its URLs; raise :class:`DataError` with a
    one-line message naming the problem.

    Local shards: the spec names at least one shard, folders hold shards, every shard exists.
    Then, for local and remote (``pipe:``, URLs) shards alike, the first samples of the first
    shard are read: it must be a readable tar whose samples have a target image, the
    ``<key>.<condition_key>.png`` condition (the message lists the conditions they have) and,
    with ``need_latent``, ``<key>.latent.npy``, with ``need_text``, ``<key>.text.npy``. Remote
    shards are only ever read, never stat'ed.
    """
    urls = _existing_urls(spec, name)
    url, samples = _probe(urls, name)
    shard = f"the first shard {url}" if url == urls[0] else f"shard {url} (the first with samples)"
    read = f"{len(samples)} sample{'s' if len(samples) > 1 else ''} read"
    if not any(_has(s, IMAGE_EXTS) for s in samples):
        members = ", ".join(sorted(k for k in samples[0] if not k.startswith("__")))
        raise DataError(
            f"{name}: no target image (<key>.jpg/.png/.webp) in {shard} ({read}); "
            f"members of sample {samples[0]['__key__']!r}: {members or 'none'}"
        )
    if condition_key and not any(
        _has(s, [f"{condition_key}.{e}" for e in IMAGE_EXTS]) for s in samples
    ):
        have = sorted({c for s in samples for c in condition_keys_of(s)})
        hint = f" (condition_key={have[0]}?)" if len(have) == 1 else ""
        raise DataError(
            f"condition_key {condition_key!r}: {shard} of {name} has no "
            f"<key>.{condition_key}.png ({read}); the condition keys it has: "
            f"{', '.join(have) or 'none'}{hint}"
        )
    if need_latent and not any(LATENT_EXT in s for s in samples):
        raise DataError(
            f"{name}: use_cached_latents is set but {shard} has no "
            f"<key>.{LATENT_EXT} ({read}; add them with data_prep.cache_latents)"
        )
    if need_text and not any(TEXT_EXT in s for s in samples):
        raise DataError(
            f"{name}: use_cached_text is set but {shard} has no <key>.{TEXT_EXT} ({read}; add "
            "them with data_prep.cache_latents --text, or set data.use_cached_text=false)"
        )
    return urls


def _has(sample: dict, exts) -> bool:
    return any(e in sample for e in exts)


def _existing_urls(spec, name: str) -> list[str]:
    """The spec's URLs; every local one exists (one directory listing per folder)."""
    if spec is None or isinstance(spec, str) and not spec.strip():
        raise DataError(f"{name} is empty: give a shard pattern, a list, a folder or pipe: URLs")
    try:
        items = _expand_items(spec)
    except (ValueError, OSError) as err:
        raise DataError(f"{name} {spec!r}: {err}") from None
    if not items:
        raise DataError(f"{name} is empty: give a shard pattern, a list, a folder or pipe: URLs")
    listings: dict[str, set[str] | None] = {}
    for item, urls in items:
        if not urls:
            if os.path.isdir(item):
                raise DataError(
                    f"{name}: folder {item} holds no shards (no *.tar files and no "
                    f"{MANIFEST_NAME} listing any)"
                )
            raise DataError(f"{name}: {item!r} matches no shard")
        missing = [u for u in urls if not is_remote_url(u) and not _listed(u, listings)]
        if not missing:
            continue
        if urls == [item]:
            raise DataError(f"{name}: {item} does not exist")
        if len(missing) == len(urls):
            raise DataError(
                f"{name}: {item!r} matches no shard: none of its {len(urls)} "
                f"file(s) exist (e.g. {missing[0]})"
            )
        raise DataError(
            f"{name}: {len(missing)} of the {len(urls)} shards of {item!r} do not "
            f"exist (e.g. {missing[0]})"
        )
    return [u for _, urls in items for u in urls]


def _listed(path: str, listings: dict[str, set[str] | None]) -> bool:
    folder, base = os.path.split(path)
    folder = folder or "."
    if folder not in listings:
        try:
            listings[folder] = set(os.listdir(folder))
        except OSError:
            listings[folder] = None
    names = listings[folder]
    return names is not None and base in names


def _probe(urls: list[str], name: str) -> tuple[str, list[dict]]:
    """The first shard that has samples (trying up to PROBE_SHARDS empty tars) and its first
    samples."""
    for i, url in enumerate(urls[:PROBE_SHARDS]):
        try:
            samples = read_first_samples(url, PROBE_SAMPLES)
        except Exception as err:
            which = "the first shard" if i == 0 else f"shard {i + 1}"
            detail = type(err).__name__ + (f": {first_line(err)}" if str(err).strip() else "")
            raise DataError(f"{name}: cannot read {which} {url}: {detail}") from None
        if samples:
            return url, samples
    tried = min(len(urls), PROBE_SHARDS)
    if tried == 1:
        raise DataError(f"{name}: the first shard {urls[0]} holds no samples (an empty tar)")
    raise DataError(f"{name}: the first {tried} shards ({urls[0]}, ...) hold no samples")
