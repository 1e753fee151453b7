"""The ``cn.*`` OmegaConf resolvers the Hydra configs use.

``${cn.tiny_backbone:DIR,PRESET}`` and ``${cn.circle_shards:DIR,N,SIZE[,SEED[,PALETTE]]}`` create a
random tiny backbone and synthetic shards on first use (under a file lock, so every DDP rank can
resolve them) and return their paths; ``${cn.swatch_shards:DIR,N,SIZE[,SEED]}`` the circles of
the composition world (a colour swatch and centre lines too, :mod:`cn_lightning.data.synthetic`);
``${cn.asset:NAME}`` is a model shipped in ``cn_lightning/assets``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from cn_lightning.errors import ConfigError


def _locked(path: str):
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path + ".lock")


def tiny_backbone(out: str, preset: str = "small", seed: int = 0) -> str:
    from cn_lightning.models.tiny import ensure_tiny_backbone

    out = os.path.expanduser(out)
    with _locked(out):
        return ensure_tiny_backbone(out, preset=preset, seed=int(seed))


def circle_shards(
    out: str, num_samples: int = 2000, size: int = 64, seed: int = 0, palette: str = "toy"
) -> str:
    from cn_lightning.data.synthetic import ensure_shards

    out = os.path.expanduser(out)
    with _locked(out):
        return ensure_shards(
            out, num_samples=int(num_samples), size=int(size), seed=int(seed), palette=str(palette)
        )


def swatch_shards(out: str, num_samples: int = 2000, size: int = 64, seed: int = 0) -> str:
    """Circle shards of the composition world: ``outline``, ``swatch`` (the circle's colour),
    ``xline`` and ``yline`` (lines through its centre)."""
    from cn_lightning.data.synthetic import ensure_shards

    out = os.path.expanduser(out)
    with _locked(out):
        return ensure_shards(
            out, num_samples=int(num_samples), size=int(size), seed=int(seed), swatch=True
        )


def asset(name: str) -> str:
    """Path of a model shipped inside the package (``cn_lightning/assets/<name>``)."""
    path = Path(__file__).resolve().parent / "assets" / name
    if not path.exists():
        raise ConfigError(f"packaged asset {name!r} not found at {path}")
    return str(path)


def register_resolvers() -> None:
    """Register the ``cn.*`` resolvers once (idempotent)."""
    resolvers = (
        ("cn.tiny_backbone", tiny_backbone),
        ("cn.circle_shards", circle_shards),
        ("cn.swatch_shards", swatch_shards),
        ("cn.asset", asset),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
