"""Loading transformers vision models from a local folder, and their preprocessing in torch.

The depth, normal and segmentation extractors run Hugging Face models saved as a folder
(``config.json`` + weights + ``preprocessor_config.json``, what ``save_pretrained`` writes and the
hub serves). The model's image processor is read only for its settings: the preprocessing itself
runs here on a whole uint8 batch on the extractor's device, with the same torchvision calls the
processor's torch backend makes (resize on uint8, then a fused rescale + normalise), so the
numbers match it while a GPU does the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cn_lightning.conditions.base import MissingWeightsError
from cn_lightning.errors import ConfigError, first_line

# PIL resampling codes (what preprocessor_config.json stores) → torchvision's names.
_RESAMPLE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def load_pretrained(
    name: str, folder: Path, auto_class: str, expected: str
) -> tuple[torch.nn.Module, Any]:
    """``(model, image_processor)`` from a local transformers folder, never the network.

    ``auto_class`` is the transformers Auto class (``AutoModelForDepthEstimation``, ...). A path
    that is not such a folder raises a one-line :class:`MissingWeightsError`.
    """
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"condition extractor {name!r}: weights {str(folder)!r} is not a transformers model "
            f"folder with config.json ({expected})"
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise MissingWeightsError(
            f"condition extractor {name!r}: weights folder {str(folder)!r} has no "
            f"preprocessor_config.json ({expected})"
        )
    import transformers  # lazy: importing transformers costs seconds

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = getattr(transformers, auto_class).from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise MissingWeightsError(
            f"condition extractor {name!r}: cannot load {str(folder)!r} as {auto_class} "
            f"({first_line(err)}); expected {expected}"
        ) from err
    return model, processor


def _size_field(size: Any, key: str) -> Any:
    # transformers 5 keeps sizes as a SizeDict, 4.x as a plain dict.
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _constrain_to_multiple(value: float, multiple: int) -> int:
    # As DPT's image processor: nearest multiple (its max/min bounds are unset for resizing).
    return int(round(value / multiple) * multiple)


class TorchPreprocessor:
    """A transformers image processor's resize + rescale + normalise, batched in torch.

    Built from the processor's settings (``size``, ``resample``, DPT's ``keep_aspect_ratio`` and
    ``ensure_multiple_of``, ``rescale_factor``, ``image_mean``/``image_std``). Call it on uint8
    ``(B, 3, H, W)`` on any device; it returns float32 ``(B, 3, h, w)``, the model's
    ``pixel_values``. Processors that crop or pad are refused (the maps must cover the image).
    """

    def __init__(self, processor: Any, name: str) -> None:
        if getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False):
            raise ConfigError(
                f"condition extractor {name!r}: image processors that crop or pad "
                f"({type(processor).__name__}) are not supported"
            )
        self.do_resize = bool(getattr(processor, "do_resize", True))
        size = processor.size
        self.height = _size_field(size, "height")
        self.width = _size_field(size, "width")
        if self.do_resize and not (self.height and self.width):
            raise ConfigError(
                f"condition extractor {name!r}: the image processor's size {size} has no "
                "height/width (only fixed-size processors, as DPT's and SegFormer's, are supported)"
            )
        self.keep_aspect_ratio = bool(getattr(processor, "keep_aspect_ratio", False))
        self.multiple = int(getattr(processor, "ensure_multiple_of", None) or 1)
        from torchvision.transforms.v2 import functional as tvF  # lazy, as transformers

        self._tvF = tvF
        resample = getattr(processor, "resample", 2)
        self.interpolation = getattr(tvF.InterpolationMode, _RESAMPLE[int(resample)])
        self.do_rescale = bool(getattr(processor, "do_rescale", True))
        self.rescale_factor = float(getattr(processor, "rescale_factor", 1 / 255))
        self.do_normalize = bool(getattr(processor, "do_normalize", True))
        self.mean = [float(m) for m in processor.image_mean] if self.do_normalize else None
        self.std = [float(s) for s in processor.image_std] if self.do_normalize else None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The model input size for an ``height`` x ``width`` image (DPT's rule)."""
        if not self.do_resize:
            return height, width
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:
            # Scale as little as possible, as DPT's processor: fit the side needing less change.
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return (
            _constrain_to_multiple(scale_h * height, self.multiple),
            _constrain_to_multiple(scale_w * width, self.multiple),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(
                f"expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.contiguous()
        if self.do_resize:
            size = self.output_size(*x.shape[-2:])
            # Resizing the uint8 batch (rounded back to uint8) is what the processor does.
            x = self._tvF.resize(x, list(size), interpolation=self.interpolation, antialias=True)
        x = x.to(torch.float32)
        if self.do_normalize:
            mean, std = self.mean, self.std
            if self.do_rescale:
                # Fused as the processor does: (x - mean/r) / (std/r), bit-identical to it.
                mean = (torch.tensor(mean, device=x.device) * (1.0 / self.rescale_factor)).tolist()
                std = (torch.tensor(std, device=x.device) * (1.0 / self.rescale_factor)).tolist()
            return self._tvF.normalize(x, mean, std)
        return x * self.rescale_factor if self.do_rescale else x


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, C, h, w) float → (B, C, H, W), ``align_corners=False`` as transformers' post-processing
    (``bicubic`` for depth, ``bilinear`` for segmentation logits)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return torch.nn.functional.interpolate(maps, size=size, mode=mode, align_corners=False)
