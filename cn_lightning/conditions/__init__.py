"""Condition extractors: one home for every condition of the paper, and plug-ins.

``get_extractor(name, **options)(image_uint8_rgb) -> uint8 condition`` is what data_prep, the
training-time fidelity metrics and inference call. Model-based extractors
(:class:`~cn_lightning.conditions.base.ModelExtractor`) take local ``weights``, a ``device`` and
a ``batch_size``, and map many images at once with ``.batch(images)``.
"""

# Importing these registers the built-ins.
from cn_lightning.conditions import classical, colour, depth, edges, lines, pose, seg  # noqa: F401
from cn_lightning.conditions.base import (
    MissingWeightsError,
    ModelExtractor,
    extract_batch,
    model_extractors,
    needs_weights,
)
from cn_lightning.conditions.classical import canny, outline
from cn_lightning.conditions.colour import swatch
from cn_lightning.conditions.registry import (
    ExtractorSpec,
    as_uint8_rgb,
    get_extractor,
    get_spec,
    import_extractor_modules,
    is_discrete,
    list_extractors,
    register_extractor,
)
from cn_lightning.conditions.seg import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    class_names_present,
    colorize,
    decode_colors,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "ExtractorSpec",
    "MissingWeightsError",
    "ModelExtractor",
    "as_uint8_rgb",
    "canny",
    "class_names_present",
    "colorize",
    "decode_colors",
    "extract_batch",
    "get_extractor",
    "get_spec",
    "import_extractor_modules",
    "is_discrete",
    "list_extractors",
    "model_extractors",
    "needs_weights",
    "outline",
    "register_extractor",
    "swatch",
]
