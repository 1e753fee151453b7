"""The one home of atomic writes: readers see the old file (or folder) or the complete new one.

Everything the project writes for later reading goes through here: exported models, checkpoints,
shards, manifests, reports, PNGs. A crash, a preemption or a full disk leaves the previous version
(or nothing) under the final name, never a half-written one.

The temporary names come from ``tempfile.mkdtemp``/``mkstemp``, which create private entries
(``0700``/``0600``). Before the rename everything is given the permissions a plain ``mkdir``/
``open`` would have under the user's umask (``0755``/``0644`` with the usual ``022``), so a
teammate on a shared cluster can read an export as with any other file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(directory: bool) -> int:
    """``0o777 & ~umask`` for a directory, ``0o666 & ~umask`` for a file."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_umask_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the umask's default permissions."""
    path = Path(path)
    dir_mode, file_mode = default_mode(True), default_mode(False)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for names, mode in ((dirs, dir_mode), (files, file_mode)):
                for name in names:
                    entry = os.path.join(root, name)
                    if not os.path.islink(entry):  # never change what a link points at
                        os.chmod(entry, mode)
        os.chmod(path, dir_mode)
    else:
        os.chmod(path, file_mode)


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the directory ``src`` to ``dst``, replacing it. Between the two renames the previous
    one is ``<dst>.old``, so ``dst`` or ``dst.old`` exists at every instant (readers fall back)."""
    src, dst = Path(src), Path(dst)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out``.

    An exception (or an interrupted run) leaves ``out`` as it was and removes the temporary folder,
    so a later run never loads a half-written model. The result has the umask's permissions.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        apply_umask_permissions(tmp)
        replace_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success it is renamed to ``path``.

    The temporary name is unique to this call, so concurrent writers (SLURM array tasks writing
    one manifest) never interleave. A crash never leaves a truncated file under the final name;
    the file gets the umask's permissions (not ``mkstemp``'s private ``0600``). ``fsync`` flushes
    the data to disk before the rename (checkpoints: the rename must not outlive the data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, default_mode(False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 1) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
