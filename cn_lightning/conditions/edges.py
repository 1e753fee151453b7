"""Model-based edge and line conditions: HED, PiDiNet soft edges, scribbles, lineart, M-LSD.

Each extractor runs one of lllyasviel's annotator networks, as packaged by ``controlnet_aux``
(its network classes, not a re-implementation), on weights read from a local file of
`huggingface.co/lllyasviel/Annotators <https://huggingface.co/lllyasviel/Annotators>`_:

========== ============================== =============================== =================
name       network                        weights                         output
========== ============================== =============================== =================
hed        ControlNet 1.1 HED (Apache-2)  ``ControlNetHED.pth``           soft edges 0..255
softedge   PiDiNet (table 5)              ``table5_pidinet.pth``          soft edges 0..255
scribble   HED + NMS/blur/threshold       ``ControlNetHED.pth``           {0, 255}
lineart    lineart Generator              ``sk_model.pth``/``sk_model2``  lines 0..255
mlsd       M-LSD large                    ``mlsd_large_512_fp32.pth``     {0, 255}
========== ============================== =============================== =================

Every map is uint8 ``(H, W)``, white (255) on black, at the input image's size. The networks run
at the size they are given (callers resize first), where ``controlnet_aux``'s detectors resize
to ``detect_resolution`` (shorter side 512, sides multiples of 64) and back: at such sizes the
two agree (see ``tests/test_extractors_edges.py``). Pre- and post-processing are batched, so a
batch of same-sized images is one forward pass on the extractor's device; the few steps done on
the CPU in numpy (sigmoid, quantisation, NMS, line drawing) copy ``controlnet_aux``'s numerics.

``weights`` is the file, or a folder holding it under its published name (e.g. a local copy of
the whole Annotators repository). ``python -m cn_lightning.conditions.random_weights`` writes
files of the same layouts filled with random values, for tests and dry runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from cn_lightning.conditions.base import (
    WEIGHTS_OPTIONS,
    MissingWeightsError,
    ModelExtractor,
    import_annotator,
    seeded,
)
from cn_lightning.conditions.registry import register_extractor
from cn_lightning.errors import first_line

ANNOTATORS = "huggingface.co/lllyasviel/Annotators"


# ------------------------------------------------------------------ weight-free post-processing
def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float map in [0, 1] → uint8 by ``(x * 255).clip(0, 255)`` and truncation, as the
    annotators quantise (truncation, not rounding: matching them bit for bit matters more)."""
    return (x * 255.0).clip(0, 255).astype(np.uint8)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """ControlNet 1.1's "safe" quantisation of soft edges into ``step + 1`` levels (float32),
    which hides the fine gradations a generator could otherwise read hidden image content from."""
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def nms(x: np.ndarray, t: float, s: float) -> np.ndarray:
    """The original ControlNet annotator's non-maximum suppression (``annotator/util.py``).

    ``x`` is blurred (Gaussian, sigma ``s``, float32); a pixel survives when it equals its 3x3
    dilation along at least one of four directions (horizontal, vertical, two diagonals), i.e.
    it is a maximum across one of them; survivors brighter than ``t`` become 255, the rest 0.
    Input any real (H, W) or (H, W, C) array; output uint8 of its shape, in {0, 255}.
    """
    x = cv2.GaussianBlur(x.astype(np.float32), (0, 0), s)
    directions = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    y = np.zeros_like(x)
    for kernel in directions:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    z = np.zeros_like(y, dtype=np.uint8)
    z[y > t] = 255
    return z


def scribble_from_edges(edges: np.ndarray) -> np.ndarray:
    """The original ControlNet's synthetic scribble from a soft-edge map (its "fake scribble"):
    ``nms(edges, 127, 3.0)`` thins the strong edges, a Gaussian blur of sigma 3 and ``> 4``
    widen them into strokes about 13 px wide, like a human's scribble.

    uint8 (H, W) soft edges (0..255) → uint8 (H, W) in {0, 255}.
    """
    strokes = cv2.GaussianBlur(nms(edges, 127, 3.0), (0, 0), 3.0)
    return np.where(strokes > 4, 255, 0).astype(np.uint8)


def draw_lines(lines: np.ndarray, height: int, width: int) -> np.ndarray:
    """Line segments ``(N, 4)`` as ``x_start, y_start, x_end, y_end`` in pixels (floats) → uint8
    (height, width) map with each segment drawn 1 px wide in 255 on 0, as ``controlnet_aux``'s
    M-LSD detector draws them: coordinates truncated toward zero, 8-connected, clipped to the
    image. Segments with non-finite or absurdly large coordinates are skipped."""
    canvas = np.zeros((height, width), np.uint8)
    for line in np.asarray(lines, dtype=np.float64).reshape(-1, 4):
        if not np.all(np.isfinite(line)) or np.abs(line).max() >= 2**30:
            continue
        x0, y0, x1, y1 = (int(v) for v in line)
        cv2.line(canvas, (x0, y0), (x1, y1), 255, 1)
    return canvas


def mlsd_segments(
    ys: np.ndarray,
    xs: np.ndarray,
    scores: np.ndarray,
    displacements: np.ndarray,
    thr_v: float,
    thr_d: float,
) -> np.ndarray:
    """M-LSD's line decoding (``controlnet_aux.mlsd.utils.pred_lines``) for one image's top-k
    line centres: ``ys, xs`` (k,) int centres on the half-resolution output grid, ``scores``
    (k,) float32 centre scores, ``displacements`` (k, 4) float32 offsets to the two ends. Keeps
    centres scoring above ``thr_v`` whose segment is longer than ``thr_d`` (grid pixels) and
    returns float64 ``(N, 4)`` segments ``x_start, y_start, x_end, y_end`` on that grid."""
    start, end = displacements[:, :2], displacements[:, 2:]
    distance = np.sqrt(np.sum((start - end) ** 2, axis=-1))
    keep = (scores > thr_v) & (distance > thr_d)
    # int64 + float32 promotes to float64 in numpy, as in pred_lines.
    x = xs[keep].astype(np.int64)[:, None]
    y = ys[keep].astype(np.int64)[:, None]
    d = displacements[keep].astype(np.float64)
    return np.concatenate([x + d[:, 0:1], y + d[:, 1:2], x + d[:, 2:3], y + d[:, 3:4]], axis=1)


# ------------------------------------------------------------------------------ common frame
class _AnnotatorExtractor(ModelExtractor):
    """One network from lllyasviel/Annotators: its file name, building and saving."""

    filename: ClassVar[str] = ""
    # Floating-point dtype of the tensors in the published file (None: as built, float32).
    file_dtype: ClassVar[torch.dtype | None] = None

    def weights_file(self, weights: Path, filename: str | None = None) -> Path:
        """``weights`` itself, or the published file name inside it when it is a folder."""
        if not weights.is_dir():
            return weights
        path = weights / (filename or self.filename)
        if not path.is_file():
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: no {path.name} in folder {str(weights)!r} "
                f"({self.expected_weights}); set {WEIGHTS_OPTIONS.format(name=self.name)}"
            )
        return path

    def load_into(self, net: torch.nn.Module, state: Any, path: Path) -> torch.nn.Module:
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as err:  # keys or shapes differ
            reason = first_line(err)
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: {str(path)!r} does not hold the expected "
                f"network ({self.expected_weights}): {reason}"
            ) from err
        return net.float().eval()

    @staticmethod
    def network() -> Callable[[], torch.nn.Module]:
        """The constructor of the untrained network (imports ``controlnet_aux``, lazily: ~8 s)."""
        raise NotImplementedError

    @classmethod
    def build(cls) -> torch.nn.Module:
        return cls.network()()

    @classmethod
    def random_state(cls, seed: int) -> dict[str, torch.Tensor]:
        """The freshly initialised network's state dict, in the published file's dtype."""
        make = cls.network()  # import first: only the construction draws from the seeded RNG
        with seeded(seed):
            state = make().state_dict()
        if cls.file_dtype is not None:
            state = {
                k: v.to(cls.file_dtype) if v.is_floating_point() else v for k, v in state.items()
            }
        return state

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        path = os.path.join(os.fspath(out_dir), cls.filename)
        torch.save(cls.random_state(seed), path)
        return path


# ------------------------------------------------------------------------------------ HED
class _HEDBase(_AnnotatorExtractor):
    expected_weights = f"ControlNetHED.pth from {ANNOTATORS}"
    filename = "ControlNetHED.pth"
    file_dtype = torch.float16  # the published file is half precision (29.4 MB); run in float32

    @staticmethod
    def network() -> Callable[[], torch.nn.Module]:
        return import_annotator("controlnet_aux.hed").ControlNetHED_Apache2

    def load(self, weights: Path) -> torch.nn.Module:
        path = self.weights_file(weights)
        return self.load_into(self.build(), self.read_state(path), path)

    def soft_edges(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB → float64 (B, H, W) edge probabilities in (0, 1)."""
        _, height, width, _ = images.shape
        # This HED takes RGB in [0, 255] (it subtracts its learnt mean itself).
        projections = self.model(self.to_tensor(images))
        # The five side outputs (full, 1/2, ... 1/16 size) are resized bilinearly (half-pixel
        # centres, as cv2.INTER_LINEAR) and averaged in float32 in the annotator's order.
        total = None
        for p in projections:
            p = F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
        mean = (total[:, 0] / len(projections)).cpu().numpy()
        return 1 / (1 + np.exp(-mean.astype(np.float64)))


@register_extractor("hed")
class HEDExtractor(_HEDBase):
    """Soft edges from ControlNet 1.1's HED (``ControlNetHED_Apache2``, ``ControlNetHED.pth``).

    uint8 RGB (B, H, W, 3) → uint8 (B, H, W) edge strength 0..255, as ``HEDdetector``.
    ``safe=True`` quantises to 3 levels (0, 127, 255) like its ``safe`` option.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        safe: bool = False,
        **options: Any,
    ) -> None:
        self.safe = bool(safe)
        super().__init__(weights, device, batch_size, **options)

    def predict(self, images: np.ndarray) -> np.ndarray:
        edge = self.soft_edges(images)
        return to_uint8(safe_step(edge) if self.safe else edge)


@register_extractor("scribble")
class ScribbleExtractor(_HEDBase):
    """Synthetic scribbles, the original ControlNet's way: HED soft edges (``ControlNetHED.pth``),
    then :func:`scribble_from_edges` (NMS at 127, blur sigma 3, ``> 4``).

    uint8 RGB (B, H, W, 3) → uint8 (B, H, W) in {0, 255}.
    """

    def predict(self, images: np.ndarray) -> np.ndarray:
        edges = to_uint8(self.soft_edges(images))
        return np.stack([scribble_from_edges(e) for e in edges])


# -------------------------------------------------------------------------------- PiDiNet
@register_extractor("softedge")
class PiDiNetExtractor(_AnnotatorExtractor):
    """Soft edges from PiDiNet (``controlnet_aux.pidi``, ``table5_pidinet.pth``).

    uint8 RGB (B, H, W, 3) → uint8 (B, H, W) edge strength 0..255, as ``PidiNetDetector``: the
    network sees BGR in [0, 1] and its last (fused) output is the map. ``safe=True`` quantises
    to 3 levels.
    """

    expected_weights = f"table5_pidinet.pth from {ANNOTATORS}"
    filename = "table5_pidinet.pth"
    # The published file is PiDiNet's training checkpoint: {"epoch", "state_dict"}, the state
    # dict saved from torch.nn.DataParallel, hence "module." before every key.
    prefix = "module."

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        safe: bool = False,
        **options: Any,
    ) -> None:
        self.safe = bool(safe)
        super().__init__(weights, device, batch_size, **options)

    @staticmethod
    def network() -> Callable[[], torch.nn.Module]:
        # PiDiNet "carv4", 60 channels, dilation and attention: table 5's model.
        return import_annotator("controlnet_aux.pidi.model").pidinet

    def load(self, weights: Path) -> torch.nn.Module:
        path = self.weights_file(weights)
        checkpoint = self.read_state(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: {str(path)!r} is not a PiDiNet checkpoint "
                f"(no 'state_dict'; expected {self.expected_weights})"
            )
        state = {k.removeprefix(self.prefix): v for k, v in checkpoint["state_dict"].items()}
        return self.load_into(self.build(), state, path)

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = self.to_tensor(images)[:, [2, 1, 0]] / 255.0  # BGR, as PiDiNet was trained
        edge = self.model(x)[-1][:, 0].cpu().numpy()
        return to_uint8(safe_step(edge) if self.safe else edge)

    # An untrained PiDiNet fuses four near-zero side maps at 0.25 each: sigmoid 0.5 +- 0.002
    # everywhere. The random file spreads the fused map so that its edges vary with the image.
    random_classifier_gain = 100.0

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        state = cls.random_state(seed)
        state["classifier.weight"] = state["classifier.weight"] * cls.random_classifier_gain
        state = {cls.prefix + k: v for k, v in state.items()}
        path = os.path.join(os.fspath(out_dir), cls.filename)
        torch.save({"epoch": 0, "state_dict": state}, path)
        return path


# -------------------------------------------------------------------------------- lineart
@register_extractor("lineart")
class LineartExtractor(_AnnotatorExtractor):
    """Line drawings from ControlNet 1.1's lineart ``Generator`` (``controlnet_aux.lineart``),
    ``sk_model.pth``, or with ``coarse=True`` the coarse model ``sk_model2.pth``.

    uint8 RGB (B, H, W, 3) → uint8 (B, H, W), white lines on black (0..255), as
    ``LineartDetector``: RGB in [0, 1] in, the network's dark-lines-on-white output inverted.
    Sides that are not multiples of 4 are padded (edge pixels repeated) and the map cropped, as
    the generator's two stride-2 stages need; ``controlnet_aux`` resizes to multiples of 64.
    """

    expected_weights = f"sk_model.pth (sk_model2.pth with coarse=True) from {ANNOTATORS}"
    filename = "sk_model.pth"
    coarse_filename = "sk_model2.pth"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        coarse: bool = False,
        **options: Any,
    ) -> None:
        self.coarse = bool(coarse)
        super().__init__(weights, device, batch_size, **options)

    @staticmethod
    def network() -> Callable[[], torch.nn.Module]:
        Generator = import_annotator("controlnet_aux.lineart").Generator
        return functools.partial(Generator, 3, 1, 3)  # RGB in, 1 channel out, 3 res blocks

    def load(self, weights: Path) -> torch.nn.Module:
        path = self.weights_file(weights, self.coarse_filename if self.coarse else None)
        return self.load_into(self.build(), self.read_state(path), path)

    def predict(self, images: np.ndarray) -> np.ndarray:
        _, height, width, _ = images.shape
        x = self.to_tensor(images) / 255.0
        pad_h, pad_w = -height % 4, -width % 4
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        line = self.model(x)[:, 0, :height, :width].cpu().numpy()
        return 255 - to_uint8(line)

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        """Writes ``sk_model.pth`` and, beside it, ``sk_model2.pth`` (seed + 1) for
        ``coarse=True``; returns the first (pass the folder to pick by ``coarse``)."""
        for offset, filename in enumerate((cls.filename, cls.coarse_filename)):
            torch.save(cls.random_state(seed + offset), os.path.join(os.fspath(out_dir), filename))
        return os.path.join(os.fspath(out_dir), cls.filename)


# ----------------------------------------------------------------------------------- M-LSD
@register_extractor("mlsd")
class MLSDExtractor(_AnnotatorExtractor):
    """Straight line segments from M-LSD large (``MobileV2_MLSD_Large``,
    ``mlsd_large_512_fp32.pth``), drawn 1 px wide.

    uint8 RGB (B, H, W, 3) → uint8 (B, H, W) in {0, 255}, as ``MLSDdetector``: the top 200 line
    centres (3x3 peak picking) scoring above ``thr_v`` with segments longer than ``thr_d`` are
    drawn. Sides that are not multiples of 32 (the backbone's stride) are resized to the nearest
    multiple (area interpolation, at least 64) and the lines scaled back, as M-LSD's own
    ``pred_lines`` does for its input size.
    """

    expected_weights = f"mlsd_large_512_fp32.pth from {ANNOTATORS}"
    filename = "mlsd_large_512_fp32.pth"
    top_k = 200

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        thr_v: float = 0.1,
        thr_d: float = 0.1,
        **options: Any,
    ) -> None:
        self.thr_v = float(thr_v)
        self.thr_d = float(thr_d)
        super().__init__(weights, device, batch_size, **options)

    @staticmethod
    def network() -> Callable[[], torch.nn.Module]:
        return import_annotator("controlnet_aux.mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large

    def load(self, weights: Path) -> torch.nn.Module:
        path = self.weights_file(weights)
        return self.load_into(self.build(), self.read_state(path), path)

    def predict(self, images: np.ndarray) -> np.ndarray:
        batch, height, width, _ = images.shape
        in_h, in_w = (max(64, int(round(side / 32)) * 32) for side in (height, width))
        if (in_h, in_w) != (height, width):
            images = np.stack(
                [cv2.resize(im, (in_w, in_h), interpolation=cv2.INTER_AREA) for im in images]
            )
        x = self.to_tensor(images)
        # RGB plus a constant channel of ones, all mapped from [0, 255] to [-1, 1].
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1) / 127.5 - 1.0
        out = self.model(x)  # (B, 9, in_h / 2, in_w / 2): centre logits, 4 end displacements
        grid_w = out.shape[3]
        heat = torch.sigmoid(out[:, 0])
        peaks = F.max_pool2d(heat, (3, 3), stride=1, padding=1)
        heat = (heat * (peaks == heat).float()).reshape(batch, -1)
        scores, indices = torch.topk(heat, min(self.top_k, heat.shape[1]), dim=-1)
        displacements = out[:, 1:5].reshape(batch, 4, -1)
        displacements = displacements.gather(2, indices[:, None].expand(-1, 4, -1))
        indices, scores = indices.cpu().numpy(), scores.cpu().numpy()
        displacements = displacements.permute(0, 2, 1).cpu().numpy()
        maps = []
        for b in range(batch):
            segments = mlsd_segments(
                indices[b] // grid_w,
                indices[b] % grid_w,
                scores[b],
                displacements[b],
                self.thr_v,
                self.thr_d,
            )
            # Output grid → input pixels (x2), then input size → image size.
            lines = 2 * segments
            lines[:, 0::2] *= width / in_w
            lines[:, 1::2] *= height / in_h
            maps.append(draw_lines(lines, height, width))
        return np.stack(maps)


__all__ = [
    "HEDExtractor",
    "LineartExtractor",
    "MLSDExtractor",
    "PiDiNetExtractor",
    "ScribbleExtractor",
    "draw_lines",
    "mlsd_segments",
    "nms",
    "safe_step",
    "scribble_from_edges",
    "to_uint8",
]
