"""OpenPose body maps, as the original ControlNet openpose condition, and their inverse.

* ``openpose``: the OpenPose body network of the ControlNet annotators
  (``body_pose_model.pth`` from huggingface.co/lllyasviel/Annotators, run through
  ``controlnet_aux.open_pose``): heatmaps and part affinity fields for a batch of same-sized
  images in one forward pass on the device, then controlnet_aux's own peak finding and person
  assembly per image, drawn as the standard 18-keypoint skeleton on black.
* :func:`draw_body_pose`: that drawing from keypoint arrays (no weights needed).
* :func:`decode_pose_map`: the keypoints back from a drawn map, for the fidelity metric.

Keypoints follow OpenPose's COCO-18 order: nose, neck, right shoulder/elbow/wrist, left
shoulder/elbow/wrist, right hip/knee/ankle, left hip/knee/ankle, right/left eye, right/left ear.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cn_lightning.conditions.base import (
    MissingWeightsError,
    ModelExtractor,
    import_annotator,
    seeded,
)
from cn_lightning.conditions.registry import register_extractor
from cn_lightning.errors import first_line

NUM_KEYPOINTS = 18

# The limbs drawn (1-based keypoint pairs, in drawing order) and the 18 colours, exactly those of
# controlnet_aux.open_pose.util.draw_bodypose (limb k is drawn in 0.6 * BODY_COLORS[k]).
BODY_LIMBS: tuple[tuple[int, int], ...] = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4
DISC_RADIUS = 4
LIMB_INTENSITY = 0.6

OPENPOSE_WEIGHTS = (
    "body_pose_model.pth from huggingface.co/lllyasviel/Annotators (the OpenPose body network "
    "of the ControlNet annotators): the file, or a folder holding it"
)
WEIGHTS_FILENAME = "body_pose_model.pth"


# --------------------------------------------------------------------------------- drawing
def _limb_color(index: int) -> list[int]:
    return [int(float(c) * LIMB_INTENSITY) for c in BODY_COLORS[index]]


def draw_body_pose(people: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """The OpenPose body drawing of ``people`` on black.

    Args:
        people: one float array (18, 2) per person, (x, y) pixel coordinates in COCO-18 order,
            NaN where a keypoint is missing.
        height, width: the map size.

    Returns:
        uint8 (height, width, 3) RGB: per person, the 17 limbs as ellipses of half-width 4 in
        0.6 x their colour, then the keypoints as discs of radius 4 in full colour; people
        drawn in order. Bit-identical to controlnet_aux's ``draw_poses`` (body only), whose
        arithmetic (coordinates divided by the size then multiplied back, truncated) it keeps.
    """
    canvas = np.zeros((height, width, 3), np.uint8)
    W, H = float(width), float(height)
    for person in people:
        person = np.asarray(person, dtype=np.float64).reshape(NUM_KEYPOINTS, 2)
        # controlnet_aux stores coordinates as fractions of the size, then scales them back.
        xs = [float(x) / W for x in person[:, 0]]
        ys = [float(y) / H for y in person[:, 1]]
        present = ~np.isnan(person).any(axis=1)
        for k, (a, b) in enumerate(BODY_LIMBS):
            i, j = a - 1, b - 1
            if not (present[i] and present[j]):
                continue
            Y = np.array([xs[i], xs[j]]) * W
            X = np.array([ys[i], ys[j]]) * H
            m_x, m_y = np.mean(X), np.mean(Y)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            polygon = cv2.ellipse2Poly(
                (int(m_y), int(m_x)), (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1
            )
            cv2.fillConvexPoly(canvas, polygon, _limb_color(k))
        for k in range(NUM_KEYPOINTS):
            if present[k]:
                center = (int(xs[k] * W), int(ys[k] * H))
                cv2.circle(canvas, center, DISC_RADIUS, list(BODY_COLORS[k]), thickness=-1)
    return canvas


# -------------------------------------------------------------------------------- decoding
def _disc_template() -> np.ndarray:
    """Offsets (dy, dx) of the pixels cv2.circle fills for a keypoint disc, as int (N, 2)."""
    size = 2 * DISC_RADIUS + 1
    canvas = np.zeros((size, size), np.uint8)
    cv2.circle(canvas, (DISC_RADIUS, DISC_RADIUS), DISC_RADIUS, 1, thickness=-1)
    return np.argwhere(canvas > 0) - DISC_RADIUS


_DISC_OFFSETS = _disc_template()
_DISC_MASK = np.zeros((2 * DISC_RADIUS + 1,) * 2, bool)
_DISC_MASK[tuple((_DISC_OFFSETS + DISC_RADIUS).T)] = True


def _disc_center(
    ys: np.ndarray, xs: np.ndarray, codes: np.ndarray, keypoint: int
) -> tuple[float, float]:
    """Centre (x, y) of keypoint ``keypoint``'s disc whose visible pixels are ``ys, xs``.

    A disc drawn at centre c covers exactly the template around c; whatever was drawn later
    may hide part of it, but never leaves it black. So c must cover every visible pixel, and
    every hidden pixel of its template must be painted (``codes``: the map's colours as
    ``r << 16 | g << 8 | b``, 0 = black). Among such centres, the one whose hidden pixels are
    best explained by what one person draws after this disc (the discs of its later keypoints,
    not its limbs nor earlier discs) wins, then the one hiding the fewest pixels, then the one
    nearest the pixel mean. With no such centre (e.g. two same-coloured discs merged into one
    blob) the pixel mean is returned."""
    mean_y, mean_x = float(ys.mean()), float(xs.mean())
    height, width = codes.shape
    best, best_key = (mean_x, mean_y), (math.inf,)
    for cy in range(int(ys.max()) - DISC_RADIUS, int(ys.min()) + DISC_RADIUS + 1):
        for cx in range(int(xs.max()) - DISC_RADIUS, int(xs.min()) + DISC_RADIUS + 1):
            if not _DISC_MASK[ys - cy + DISC_RADIUS, xs - cx + DISC_RADIUS].all():
                continue
            ty, tx = _DISC_OFFSETS[:, 0] + cy, _DISC_OFFSETS[:, 1] + cx
            inside = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
            covered = codes[ty[inside], tx[inside]]
            if not covered.all():
                continue
            hidden = covered[covered != _DISC_CODES[keypoint]]
            unexplained = int((~np.isin(hidden, _DISC_CODES[keypoint + 1 :])).sum())
            key = (unexplained, len(hidden), (cx - mean_x) ** 2 + (cy - mean_y) ** 2)
            if key < best_key:
                best, best_key = (float(cx), float(cy)), key
    return best


def _color_codes(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB → int64 (...) ``r << 16 | g << 8 | b``."""
    image = image.astype(np.int64)
    return (image[..., 0] << 16) | (image[..., 1] << 8) | image[..., 2]


_DISC_CODES = _color_codes(np.array(BODY_COLORS, np.uint8))


def _find_discs(pose_map: np.ndarray, min_area: int) -> list[list[tuple[float, float]]]:
    """Per keypoint, the centres (x, y) of the blobs of its exact full colour."""
    codes = _color_codes(pose_map)
    discs: list[list[tuple[float, float]]] = []
    for keypoint, color in enumerate(BODY_COLORS):
        mask = np.all(pose_map == np.array(color, np.uint8), axis=2).astype(np.uint8)
        found: list[tuple[float, float]] = []
        if mask.any():
            n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            for c in range(1, n):
                if stats[c, cv2.CC_STAT_AREA] < min_area:
                    continue
                x0, y0, w, h = stats[c, :4]
                ys, xs = np.nonzero(labels[y0 : y0 + h, x0 : x0 + w] == c)
                found.append(_disc_center(ys + y0, xs + x0, codes, keypoint))
        discs.append(found)
    return discs


def _limb_score(
    pose_map: np.ndarray, limb: int, p: tuple[float, float], q: tuple[float, float]
) -> float:
    """How well limb ``limb`` joins discs p and q: along the segment p→q (every half pixel),
    the share of pixels in the limb's colour among those not in the two end discs' colours.
    Discs so close that they hide the whole limb score 1 when they touch, else 0."""
    a, b = BODY_LIMBS[limb]
    ends = np.array([BODY_COLORS[a - 1], BODY_COLORS[b - 1]], np.uint8)
    length = math.hypot(q[0] - p[0], q[1] - p[1])
    t = np.linspace(0.0, 1.0, max(2, int(2 * length) + 1))
    xs = np.clip(np.rint(p[0] + t * (q[0] - p[0])).astype(int), 0, pose_map.shape[1] - 1)
    ys = np.clip(np.rint(p[1] + t * (q[1] - p[1])).astype(int), 0, pose_map.shape[0] - 1)
    pixels = pose_map[ys, xs]
    hits = np.all(pixels == np.array(_limb_color(limb), np.uint8), axis=1)
    in_ends = (pixels[:, None, :] == ends[None]).all(axis=2).any(axis=1)
    counted = ~in_ends
    if not counted.any():
        return 1.0 if length <= 2 * DISC_RADIUS + 2 else 0.0
    return float(hits[counted].mean())


def _merge_fragments(
    groups: list[list[int]], nodes: list[tuple[int, tuple[float, float]]]
) -> list[list[int]]:
    """Join the limb-linked groups of discs that are pieces of one person.

    A person whose linking keypoint is missing (the neck, say) is drawn as unconnected pieces
    (head, arms, legs). Two groups are joined when they share no keypoint and their gap (the
    closest pair of discs) is at most the larger one's extent (its box diagonal, at least two
    disc diameters): closest pair first, until no pair qualifies."""
    min_extent = 2 * (2 * DISC_RADIUS + 1)

    def points(group: list[int]) -> np.ndarray:
        return np.array([nodes[n][1] for n in group], np.float64)

    def extent(group: list[int]) -> float:
        pts = points(group)
        return max(float(np.hypot(*(pts.max(0) - pts.min(0)))), min_extent)

    groups = [list(g) for g in groups]
    while True:
        best, best_gap = None, math.inf
        for i in range(len(groups)):
            kinds_i = {nodes[n][0] for n in groups[i]}
            for j in range(i + 1, len(groups)):
                if kinds_i & {nodes[n][0] for n in groups[j]}:
                    continue
                diff = points(groups[i])[:, None] - points(groups[j])[None]
                gap = float(np.hypot(diff[..., 0], diff[..., 1]).min())
                if gap <= max(extent(groups[i]), extent(groups[j])) and gap < best_gap:
                    best, best_gap = (i, j), gap
        if best is None:
            return groups
        i, j = best
        groups[i] += groups.pop(j)


def decode_pose_map(
    pose_map: np.ndarray, min_area: int = 4, min_limb_score: float = 0.5
) -> list[np.ndarray]:
    """The people of a map drawn by :func:`draw_body_pose` (or the ``openpose`` extractor).

    Keypoints are the blobs of the 18 exact disc colours (the discs are drawn last, in full
    colour; the limbs' 0.6-intensity colours never equal one); a disc's centre is the one whose
    drawn disc explains its blob, so partly covered discs still come back exactly (see
    :func:`_disc_center`). Discs are grouped into people along the limbs: two discs that a limb
    joins are linked when at least ``min_limb_score`` of the straight segment between them
    shows that limb's colour (a greedy one-to-one match per limb, best first, as OpenPose
    assembles its people). Pieces of a person that no drawn limb joins (its neck missing, say)
    are then joined by proximity when they share no keypoint (see :func:`_merge_fragments`).
    A disc wholly hidden by later drawing is lost (it reads as missing).

    Args:
        pose_map: uint8 (H, W, 3) RGB map as drawn (exact colours; no resampling or JPEG).
        min_area: blobs smaller than this many pixels are ignored (stray pixels).
        min_limb_score: share of a limb segment that must show the limb's colour.

    Returns:
        One float64 (18, 2) array of (x, y) pixel centres per person, NaN for missing keypoints,
        ordered by the mean x then mean y of their keypoints; ``[]`` when no disc is found.
    """
    pose_map = np.asarray(pose_map)
    if pose_map.dtype != np.uint8 or pose_map.ndim != 3 or pose_map.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 (H, W, 3) pose map, got {pose_map.dtype} {pose_map.shape}"
        )
    discs = _find_discs(pose_map, min_area)
    nodes: list[tuple[int, tuple[float, float]]] = []  # (keypoint, centre) per disc
    index: dict[tuple[int, int], int] = {}  # (keypoint, i-th disc of it) → node
    for k, found in enumerate(discs):
        for i, xy in enumerate(found):
            index[(k, i)] = len(nodes)
            nodes.append((k, xy))
    if not nodes:
        return []
    parent = list(range(len(nodes)))

    def root(n: int) -> int:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for limb, (a, b) in enumerate(BODY_LIMBS):
        a, b = a - 1, b - 1
        pairs = [
            (_limb_score(pose_map, limb, p, q), i, j)
            for i, p in enumerate(discs[a])
            for j, q in enumerate(discs[b])
        ]
        used_a: set[int] = set()
        used_b: set[int] = set()
        for score, i, j in sorted(pairs, reverse=True):
            if score < min_limb_score or i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            na, nb = index[(a, i)], index[(b, j)]
            parent[root(na)] = root(nb)

    groups: dict[int, list[int]] = {}
    for n in range(len(nodes)):
        groups.setdefault(root(n), []).append(n)
    people = _merge_fragments(list(groups.values()), nodes)

    out = []
    for group in people:
        person = np.full((NUM_KEYPOINTS, 2), np.nan)
        for n in group:
            k, xy = nodes[n]
            if np.isnan(person[k, 0]):  # a second disc of the same keypoint: keep the first
                person[k] = xy
        out.append(person)
    out.sort(key=lambda p: (float(np.nanmean(p[:, 0])), float(np.nanmean(p[:, 1]))))
    return out


# ------------------------------------------------------------------------------- extractor
def _openpose_modules() -> tuple[Any, Any, Any]:
    """controlnet_aux's ``open_pose.util``, ``bodypose_model`` and ``Body``, imported lazily."""
    util = import_annotator("controlnet_aux.open_pose.util")
    body = import_annotator("controlnet_aux.open_pose.body")
    model = import_annotator("controlnet_aux.open_pose.model")
    return util, model.bodypose_model, body.Body


class _ReplayNet(torch.nn.Module):
    """Stands in for the body network inside controlnet_aux's ``Body.__call__``: returns the
    outputs already computed for this image by the batched forward pass, so that all of
    controlnet_aux's pre/post-processing runs unchanged around it. It checks that Body feeds
    it exactly the input the batch was computed from."""

    def __init__(self, expected_input: torch.Tensor, outputs: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        # Body reads the device of the first parameter: a CPU one, as the outputs are.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.expected_input = expected_input
        self.outputs = outputs

    def forward(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if data.shape != self.expected_input.shape or not torch.equal(data, self.expected_input):
            raise RuntimeError(
                "controlnet_aux's Body preprocessed the image differently from the batched pass "
                "(controlnet_aux version change?)"
            )
        return self.outputs


def body_network_input(image_bgr: np.ndarray) -> np.ndarray:
    """controlnet_aux ``Body.__call__``'s network input for one BGR uint8 (H, W, 3) image: scaled
    to 184 px high (one scale, 0.5 x 368), padded right/down to a multiple of 8 with 128, then
    ``/ 256 - 0.5``; float32 (1, 3, h, w)."""
    util, _, _ = _openpose_modules()  # lazy: importing controlnet_aux takes seconds
    scale = 0.5 * 368 / image_bgr.shape[0]
    resized = util.smart_resize_k(image_bgr, fx=scale, fy=scale)
    padded, _ = util.padRightDownCorner(resized, 8, 128)
    im = np.transpose(np.float32(padded[:, :, :, np.newaxis]), (3, 2, 0, 1)) / 256 - 0.5
    return np.ascontiguousarray(im)


def people_from_body(candidate: np.ndarray, subset: np.ndarray) -> list[np.ndarray]:
    """controlnet_aux's ``(candidate, subset)`` → one float (18, 2) pixel-coordinate array per
    person, NaN for missing keypoints (the people ``Body.format_body_result`` makes)."""
    people = []
    for row in subset:
        person = np.full((NUM_KEYPOINTS, 2), np.nan)
        for k, c in enumerate(row[:NUM_KEYPOINTS].astype(int)):
            if c != -1:
                person[k] = candidate[c][:2]
        people.append(person)
    return people


def resolve_body_weights(weights: Path) -> Path:
    """The ``body_pose_model.pth`` file given directly or inside a folder."""
    path = weights / WEIGHTS_FILENAME if weights.is_dir() else weights
    if not path.is_file():
        raise MissingWeightsError(
            f"condition extractor 'openpose': no {WEIGHTS_FILENAME} in {str(weights)!r} "
            f"({OPENPOSE_WEIGHTS})"
        )
    return path


@register_extractor("openpose")
class OpenPoseExtractor(ModelExtractor):
    """OpenPose body skeletons (the original ControlNet openpose condition): uint8 (H, W, 3).

    Args:
        weights: ``body_pose_model.pth`` (lllyasviel/Annotators) or a folder holding it.
        device, batch_size: as :class:`~cn_lightning.conditions.base.ModelExtractor`.

    Output per image: the detected people drawn by :func:`draw_body_pose` at the input size
    (black when nobody is found). Detection is controlnet_aux's (one scale: the image resized to
    184 px high); only the network pass is batched, its peak finding and assembly run per image
    on the CPU. Body only (no hands or face), as the original ``control_sd15_openpose`` maps.
    """

    expected_weights = OPENPOSE_WEIGHTS

    def load(self, weights: Path) -> Any:
        util, bodypose_model, _ = _openpose_modules()
        path = resolve_body_weights(weights)
        model = bodypose_model()
        state = self.read_state(path)
        try:
            # Body's key transfer: the file's keys lack the network's first name component.
            model.load_state_dict(util.transfer(model, state))
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as err:
            raise MissingWeightsError(
                f"condition extractor {self.name!r}: {str(path)!r} is not the OpenPose body "
                f"network ({type(err).__name__}: {first_line(err)[:200]}); expected "
                f"{OPENPOSE_WEIGHTS}"
            ) from err
        return model

    def detect(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """uint8 (B, H, W, 3) RGB → controlnet_aux's ``(candidate, subset)`` per image.

        The network runs once on the batch; ``Body.__call__`` then runs per image around a
        stand-in network that returns that image's outputs."""
        _, _, Body = _openpose_modules()
        # controlnet_aux's detector flips RGB to BGR: the network was trained on BGR.
        bgr = [np.ascontiguousarray(image[:, :, ::-1]) for image in images]
        inputs = [torch.from_numpy(body_network_input(image)) for image in bgr]
        heat_paf = self.model(torch.cat(inputs).to(self.device))
        paf, heat = (t.float().cpu() for t in heat_paf)
        results = []
        for i, image in enumerate(bgr):
            body = Body.__new__(Body)  # skips Body.__init__, which would load the file again
            body.model = _ReplayNet(inputs[i], (paf[i : i + 1], heat[i : i + 1]))
            results.append(body(image))
        return results

    def people(self, images: np.ndarray) -> list[list[np.ndarray]]:
        """uint8 (B, H, W, 3) RGB → per image, the people as float (18, 2) pixel coordinates."""
        return [people_from_body(c, s) for c, s in self.detect(images)]

    def predict(self, images: np.ndarray) -> np.ndarray:
        height, width = images.shape[1:3]
        return np.stack([draw_body_pose(p, height, width) for p in self.people(images)])

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        """The full-size body network with PyTorch's default random init, saved as
        ``body_pose_model.pth`` in the published file's key layout (the network's keys without
        their first component, which Body's key transfer adds back): about 200 MB."""
        _, bodypose_model, _ = _openpose_modules()
        with seeded(seed):
            model = bodypose_model()
        state = {k.split(".", 1)[1]: v for k, v in model.state_dict().items()}
        path = Path(out_dir) / WEIGHTS_FILENAME
        torch.save(state, path)
        return os.fspath(path)


__all__ = [
    "BODY_COLORS",
    "BODY_LIMBS",
    "OPENPOSE_WEIGHTS",
    "OpenPoseExtractor",
    "decode_pose_map",
    "draw_body_pose",
    "people_from_body",
]
