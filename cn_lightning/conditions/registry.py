"""Open registry of condition extractors.

An extractor maps a uint8 RGB image ``(H, W, 3)`` to a uint8 condition image, either
``(H, W)`` (single channel, e.g. edges) or ``(H, W, 3)`` (e.g. a colour-coded segmentation).
The same functions serve ``data_prep`` (building shards), on-the-fly conditioning, inference
and the fidelity metrics, so a condition is defined in exactly one place.

Register a classical extractor as a function, or a model-based one as a class whose constructor
takes its options (e.g. ``weights=/path/to/local.pth``) and whose ``__call__`` does the work::

    @register_extractor("hed")
    class HED:
        def __init__(self, weights: str, device: str = "cpu"): ...
        def __call__(self, image: np.ndarray) -> np.ndarray: ...
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cn_lightning.errors import UnknownNameError

Extractor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ExtractorSpec:
    """A registered extractor.

    ``discrete`` marks label-like conditions (segmentation maps) that must be resized with
    nearest-neighbour interpolation so that no colour outside the palette appears.
    """

    name: str
    factory: Callable
    discrete: bool = False
    description: str = ""


_REGISTRY: dict[str, ExtractorSpec] = {}


def register_extractor(
    name: str, *, discrete: bool = False, overwrite: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator registering a function or class as the extractor ``name``."""

    def decorate(obj: Callable) -> Callable:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].factory is not obj:
            raise ValueError(f"condition extractor {name!r} is already registered")
        doc = (inspect.getdoc(obj) or "").split("\n")[0]
        if inspect.isclass(obj) and hasattr(obj, "expected_weights"):
            obj.name = name  # model-based extractors name themselves in their errors
        _REGISTRY[name] = ExtractorSpec(name, obj, discrete, doc)
        return obj

    return decorate


def list_extractors() -> list[str]:
    """Names of all registered extractors, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ExtractorSpec:
    """The registry entry for ``name``; a clear error lists the known names otherwise."""
    if name not in _REGISTRY:
        raise UnknownNameError(
            f"unknown condition extractor {name!r}; registered: {', '.join(list_extractors())}. "
            "Register your own with @cn_lightning.conditions.register_extractor(name) and load "
            "its module (data_prep tools take --extractor-module)."
        )
    return _REGISTRY[name]


def is_discrete(name: str) -> bool:
    """True for label-like conditions (resize them with nearest neighbour). Unknown → False."""
    spec = _REGISTRY.get(name)
    return bool(spec and spec.discrete)


def get_extractor(name: str, **options) -> Extractor:
    """A ready-to-call extractor: classes are instantiated with ``options``, functions get
    them bound as keyword arguments."""
    factory = get_spec(name).factory
    if inspect.isclass(factory):
        return factory(**options)
    return functools.partial(factory, **options) if options else factory


def import_extractor_modules(modules: list[str] | None) -> None:
    """Import user modules whose import registers more extractors (``--extractor-module``)."""
    for module in modules or []:
        importlib.import_module(module)


def as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Check and normalise extractor input: uint8 ``(H, W, 3)``; grey images are repeated."""
    if image.dtype != np.uint8:
        raise TypeError(f"extractors take uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"extractors take (H, W, 3) images, got shape {image.shape}")
    return image[:, :, :3]
