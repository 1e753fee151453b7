"""Image-quality metrics from local weights: FID (torchmetrics, torch-fidelity's Inception) and
CLIP score (open_clip). Both refuse a pickled weights file that would run code before any
library unpickles it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from PIL import Image
from torch import Tensor

from cn_lightning.errors import ConfigError, first_line
from cn_lightning.serialization import verify_safe_checkpoint

INCEPTION_HINT = (
    "torch-fidelity's Inception weights pt_inception-2015-12-05-6726825d.pth (from "
    "github.com/toshas/torch-fidelity releases), copied to a local path"
)


def build_fid(weights_path: str, feature: int = 2048) -> torchmetrics.Metric:
    """torchmetrics' FID with Inception weights read from a local file.

    ``feature`` picks the Inception layer: 2048 (the standard pool features), or 768/192/64
    (earlier layers: cheaper, e.g. for smoke tests, but not comparable with published FIDs).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = Path(os.path.expanduser(weights_path))
    if not path.is_file():
        raise ConfigError(
            f"FID Inception weights {str(path)!r} not found: expected {INCEPTION_HINT}"
        )
    # torch-fidelity reads the file with torch.load(weights_only=False): check it first, so a
    # downloaded pickle that would run code is refused before it is unpickled.
    verify_safe_checkpoint(path)
    try:
        return FrechetInceptionDistance(
            feature=feature, normalize=True, feature_extractor_weights_path=str(path)
        )
    except (RuntimeError, KeyError, OSError, EOFError, ValueError) as err:
        raise ConfigError(
            f"{str(path)!r} is not an Inception weights file ({INCEPTION_HINT}): {first_line(err)}"
        ) from err


class ClipScore(torchmetrics.Metric):
    """CLIP score of images against prompts with an open_clip model: mean of 100 x max(cos, 0).

    :meth:`scores` gives the per-sample values of images (B, 3, H, W) in [0, 1] and their
    prompts; ``update(scores)`` accumulates them (so the scores are computed once per sample).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.preprocess(Image.fromarray(to_uint8(im))) for im in images]).to(
            device
        )
        image_emb = self.model.encode_image(pixels).float()
        text_emb = self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        return 100 * cos.clamp(min=0)

    def update(self, scores: Tensor) -> None:
        self.score_sum += scores.sum().to(self.score_sum)
        self.count += len(scores)

    def compute(self) -> Tensor:
        return (self.score_sum / self.count.clamp(min=1)).float()


def build_clip_score(model_name: str, weights: str | None) -> ClipScore:
    """open_clip from local weights: ``NAME`` + a weights file, or ``local-dir:FOLDER``
    (config + weights)."""
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(os.path.expanduser(model_name.removeprefix("local-dir:")))
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(
                f"--clip-model {model_name!r}: no open_clip_config.json in {str(folder)!r}"
            )
        name, kwargs = f"local-dir:{folder}", {"weights_only": True}
        pickled = [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    else:
        if weights is None:
            raise ConfigError(
                f"--clip-model {model_name!r} needs --clip-weights: a local open_clip weights file"
            )
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise ConfigError(
                f"CLIP weights {str(path)!r} not found: expected a local open_clip checkpoint file"
            )
        if model_name not in open_clip.list_models():
            raise ConfigError(
                f"unknown open_clip architecture {model_name!r} (see open_clip.list_models())"
            )
        name, kwargs = (
            model_name,
            {"pretrained": str(path), "load_weights": True, "weights_only": True},
        )
        pickled = [] if path.suffix == ".safetensors" else [path]
    for file in pickled:  # a refused pickle gets our one-line error (open_clip's is a traceback)
        verify_safe_checkpoint(file)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
    except (RuntimeError, KeyError, OSError, ValueError) as err:
        raise ConfigError(f"cannot load CLIP model {model_name!r}: {first_line(err)}") from err
    return ClipScore(model, preprocess, open_clip.get_tokenizer(name))


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] to uint8 (H, W, 3)."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def quantize(images: Tensor) -> Tensor:
    """Round to 8 bits, as the images are saved and seen; metrics are computed on these."""
    return (images.float().clamp(0, 1) * 255).round() / 255
