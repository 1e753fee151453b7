"""The common frame of model-based condition extractors: local weights, device, batches.

A model-based extractor (HED, depth, pose, ...) is a :class:`ModelExtractor` subclass registered
with :func:`~cn_lightning.conditions.registry.register_extractor`. It loads its network from a
local path only (``weights``; never a download), runs on ``device``, and maps a batch of
same-sized uint8 RGB images to uint8 condition maps in one forward pass (:meth:`predict`), which
is how ``data_prep`` keeps a GPU busy. Calling it on one image is a batch of one.

Every subclass can also write weights of its real on-disk format filled with random values
(:meth:`write_random_weights`): tests, CI and a user checking a pipeline run the same loading
code as with the published weights, without downloading anything.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from cn_lightning.conditions.registry import as_uint8_rgb, get_spec, list_extractors
from cn_lightning.errors import ConfigError, first_line

# Where each way of running an extractor takes its weights, for the error messages.
WEIGHTS_OPTIONS = (
    "--weights PATH (data_prep.from_images, generate, evaluate) or "
    "extractors.{name}.weights=PATH (training)"
)


class MissingWeightsError(ConfigError):
    """A model-based extractor has no usable local weights."""


def check_weights(name: str, weights: str | os.PathLike | None, expected: str) -> Path:
    """The existing local weights path for extractor ``name``, else a one-line error that
    names the option to set and the file expected (``expected``: what and where from)."""
    where = WEIGHTS_OPTIONS.format(name=name)
    if weights is None or str(weights) == "":
        raise MissingWeightsError(
            f"condition extractor {name!r} needs local weights ({expected}): set {where}"
        )
    path = Path(os.path.expanduser(str(weights)))
    if not path.exists():
        raise MissingWeightsError(
            f"condition extractor {name!r}: weights {str(path)!r} not found ({expected}); "
            f"set {where}"
        )
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → the GPU when there is one, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class ModelExtractor:
    """Base class of the model-based extractors.

    Args:
        weights: local path of the model's weights (a file or a folder, per extractor).
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ``cuda:1``, ...
        batch_size: most images per forward pass in :meth:`batch`.

    Subclasses set :attr:`expected_weights` (what the file is and where it comes from, for the
    error messages and docs) and implement :meth:`load`, :meth:`predict` and
    :meth:`write_random_weights`.
    """

    name: ClassVar[str] = ""
    expected_weights: ClassVar[str] = ""

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        **options: Any,
    ) -> None:
        if options:
            raise ConfigError(
                f"condition extractor {self.name!r}: unknown options {sorted(options)}"
            )
        self.weights = check_weights(self.name, weights, self.expected_weights)
        self.device = resolve_device(device)
        self.batch_size = max(1, int(batch_size))
        self.model = self.load(self.weights)
        if isinstance(self.model, torch.nn.Module):
            self.model = self.model.to(self.device).eval().requires_grad_(False)

    # ------------------------------------------------------------------------ subclasses
    def load(self, weights: Path) -> Any:
        """Build the network and load ``weights`` (on the CPU; the base moves it)."""
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB → uint8 (B, H, W) or (B, H, W, 3) condition maps."""
        raise NotImplementedError

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        """Write weights of the real on-disk format with random values under ``out_dir``;
        returns the path to pass as ``weights``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- calls
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One uint8 (H, W, 3) image → its uint8 condition map (H, W) or (H, W, 3)."""
        return self.batch([image])[0]

    def batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Condition maps of many images: same-sized images share forward passes of up to
        ``batch_size``; the output order is the input order."""
        images = [as_uint8_rgb(np.asarray(im)) for im in images]
        out: list[np.ndarray | None] = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                with torch.inference_mode():
                    maps = self.predict(np.stack([images[i] for i in chunk]))
                for i, m in zip(chunk, maps, strict=True):
                    out[i] = np.ascontiguousarray(m)
        return out  # type: ignore[return-value]

    # --------------------------------------------------------------------------- helpers
    def read_state(self, path: Path) -> Any:
        """``torch.load`` of a local weights file on the CPU, tensors only: a file that holds
        anything else (code, objects) is refused in one line, never unpickled."""
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's own message invites weights_only=False, i.e. running the file's code.
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: cannot read weights {str(path)!r} "
                f"({self.expected_weights}): not a file of plain tensors (refused unread: "
                "loading it could run code)"
            ) from err
        except Exception as err:  # unreadable or not a torch file: one line, not a traceback
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: cannot read weights {str(path)!r} "
                f"({self.expected_weights}): {first_line(err)}"
            ) from err

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) → float32 (B, 3, H, W) in [0, 255] on the device."""
        return torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float()


def import_annotator(module: str) -> ModuleType:
    """Import a module of ``controlnet_aux`` (lllyasviel's annotators). Importing any part of it
    imports all its detectors, which warn about optional packages (mediapipe, timm's renamed
    modules) that none of ours use: those warnings are muted. Costs seconds: call it lazily."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


def needs_weights(name: str) -> bool:
    """Whether the registered extractor ``name`` loads a model (and so needs ``weights``)."""
    factory = get_spec(name).factory
    return inspect.isclass(factory) and issubclass(factory, ModelExtractor)


def model_extractors() -> list[str]:
    """Names of the registered extractors that load a model."""
    return [n for n in list_extractors() if needs_weights(n)]


def extract_batch(extractor: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """Condition maps of ``images`` with any extractor: batched when it can, else one by one."""
    if hasattr(extractor, "batch"):
        return extractor.batch(images)
    return [extractor(image) for image in images]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build modules inside this to get the same random initial weights on every machine,
    without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = [
    "MissingWeightsError",
    "ModelExtractor",
    "WEIGHTS_OPTIONS",
    "check_weights",
    "extract_batch",
    "import_annotator",
    "model_extractors",
    "needs_weights",
    "resolve_device",
    "seeded",
]
