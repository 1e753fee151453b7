"""Condition extractors: one home for canny, outline, segmentation palettes and plug-ins.

``get_extractor(name, **options)(image_uint8_rgb) -> uint8 condition`` is what data_prep, the
training-time fidelity metrics and inference call.
"""

from cn_lightning.conditions import classical, seg  # noqa: F401  (registers the built-ins)
from cn_lightning.conditions.classical import canny, outline
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
    "as_uint8_rgb",
    "canny",
    "class_names_present",
    "colorize",
    "decode_colors",
    "get_extractor",
    "get_spec",
    "import_extractor_modules",
    "is_discrete",
    "list_extractors",
    "outline",
    "register_extractor",
]
