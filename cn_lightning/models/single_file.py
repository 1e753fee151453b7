"""Load Stable Diffusion 1.x / 2.x / XL from one original-format (CompVis/Stability LDM or
Stability ``sgm``) checkpoint, offline.

The weights come from the file; the architectures come from config folders shipped in this package
(``configs/sd15``, ``configs/sd21``, ``configs/sd21-base``, ``configs/sdxl``, each laid out like a
diffusers pipeline folder, configs only). diffusers' single-file converters do the key mapping, so
nothing here needs the Hub.

An SDXL base file holds the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.``, CLIP ViT-L under ``conditioner.embedders.0.transformer.`` (HF layout) and
OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (OpenCLIP layout, fused qkv, text
projection); they become ``text_encoder`` (``CLIPTextModel``) and ``text_encoder_2``
(``CLIPTextModelWithProjection``), as in a diffusers SDXL folder.

The CLIP BPE vocabulary (``configs/clip_bpe/vocab.json`` + ``merges.txt``) is shipped once, built
from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``; the per-variant ``tokenizer/`` folders
only hold the tokenizer settings (SD2 and SDXL's ``tokenizer_2`` pad with ``"!"``, id 0, like the
public SD2 / SDXL tokenizers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cn_lightning.errors import BackboneLoadError, ConfigError, first_line
from cn_lightning.serialization import read_state_dict

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CLIP_BPE_DIR = CONFIG_ROOT / "clip_bpe"
VARIANTS = ("sd15", "sd21", "sd21-base", "sdxl")
# The variants each family's weights can be loaded as.
VARIANTS_BY_FAMILY = {"sd1": ("sd15",), "sd2": ("sd21", "sd21-base"), "sdxl": ("sdxl",)}
# SD2 weights cannot tell v-prediction (768) from epsilon (512 "base"): the file must record it,
# or the user names the variant. Never guessed.
SD2_VARIANT_BY_PREDICTION = {"v_prediction": "sd21", "epsilon": "sd21-base"}
# The shipped config whose cross-attention width (the text encoder's; SDXL: both, 768 + 1280) a
# model has.
SHIPPED_VARIANT_BY_WIDTH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}

_UNET_PROBE = "model.diffusion_model.input_blocks.0.0.weight"
_VAE_PROBE = "first_stage_model.encoder.conv_in.weight"
_CLIP_PROBE = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_OPEN_CLIP_PROBE = "cond_stage_model.model.token_embedding.weight"
# SDXL (Stability's sgm layout): the two text encoders of the base model; the refiner has only
# OpenCLIP bigG, as embedder 0.
SDXL_CLIP_PREFIX = "conditioner.embedders.0."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1."
_SDXL_CLIP_PROBE = SDXL_CLIP_PREFIX + "transformer.text_model.embeddings.token_embedding.weight"
_SDXL_OPEN_CLIP_PROBE = SDXL_OPEN_CLIP_PREFIX + "model.token_embedding.weight"
_SDXL_REFINER_PROBE = "conditioner.embedders.0.model.token_embedding.weight"
_CROSS_ATTN_KEY = re.compile(r"model\.diffusion_model\..*\.attn2\.to_k\.weight")


def config_dir(variant: str) -> Path:
    """The shipped diffusers-layout config folder of ``variant`` (``sd15``, ``sd21``,
    ``sd21-base``, ``sdxl``)."""
    if variant not in VARIANTS:
        raise BackboneLoadError(
            f"unknown Stable Diffusion variant {variant!r}; expected one of {', '.join(VARIANTS)}"
        )
    return CONFIG_ROOT / variant


def variant_for_cross_attention(width: int | None) -> str:
    """The shipped architecture (``sd15``, ``sd21`` or ``sdxl``) a UNet or ControlNet with this
    text-encoder width (768, 1024 or 2048) has; anything else asks for the base model (one line,
    :class:`ConfigError`)."""
    variant = SHIPPED_VARIANT_BY_WIDTH.get(width or 0)
    if variant is None:
        raise ConfigError(
            f"cannot tell the architecture from a cross-attention width of {width} (SD1.x: 768, "
            "SD2.x: 1024, SDXL: 2048): pass the base model it was trained on (--base, or the "
            "pipeline's UNet)"
        )
    return variant


# Where checkpoints record their prediction type: Stability's model spec (safetensors metadata),
# kohya-ss trainers, and plain keys some converters write.
_PREDICTION_KEYS = (
    "modelspec.prediction_type",
    "prediction_type",
    "parameterization",
    "ss_v_parameterization",
)
_PREDICTION_VALUES = {
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
    "true": "v_prediction",
    "eps": "epsilon",
    "epsilon": "epsilon",
    "false": "epsilon",
}


def recorded_prediction_type(records: dict[str, Any]) -> str | None:
    """``"v_prediction"`` / ``"epsilon"`` when the file records it (see ``_PREDICTION_KEYS``),
    else ``None``."""
    for key in _PREDICTION_KEYS:
        value = records.get(key)
        if value is not None and str(value).strip().lower() in _PREDICTION_VALUES:
            return _PREDICTION_VALUES[str(value).strip().lower()]
    return None


def detect_family(state_dict: dict[str, Tensor], path: str | Path = "<state dict>") -> str:
    """Return ``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the text encoder layout; raise if this is no
    SD1/SD2/SDXL base checkpoint."""
    missing = [
        name for name, key in (("UNet", _UNET_PROBE), ("VAE", _VAE_PROBE)) if key not in state_dict
    ]
    if missing:
        probe = _UNET_PROBE if "UNet" in missing else _VAE_PROBE
        raise BackboneLoadError(
            f"{path}: not an original-format Stable Diffusion checkpoint "
            f"(no {' or '.join(missing)} weights, "
            f"e.g. {probe!r}); expected a full SD1.x/SD2.x/SDXL .safetensors/.ckpt"
        )
    if _CLIP_PROBE in state_dict:
        return "sd1"
    if _OPEN_CLIP_PROBE in state_dict:
        return "sd2"
    if _SDXL_CLIP_PROBE in state_dict and _SDXL_OPEN_CLIP_PROBE in state_dict:
        return "sdxl"
    if _SDXL_REFINER_PROBE in state_dict:
        raise BackboneLoadError(
            f"{path}: looks like the SDXL refiner (one OpenCLIP text encoder, "
            f"{_SDXL_REFINER_PROBE!r}); ControlNets train on the SDXL base model"
        )
    if any(k.startswith("conditioner.embedders.") for k in state_dict):
        lacking = _SDXL_OPEN_CLIP_PROBE if _SDXL_CLIP_PROBE in state_dict else _SDXL_CLIP_PROBE
        raise BackboneLoadError(
            f"{path}: looks like an SDXL checkpoint but has no {lacking!r}; expected a full SDXL "
            "base checkpoint (CLIP ViT-L as conditioner.embedders.0, OpenCLIP bigG as "
            "conditioner.embedders.1)"
        )
    raise BackboneLoadError(
        f"{path}: no text encoder weights "
        f"({_CLIP_PROBE!r} for SD1, {_OPEN_CLIP_PROBE!r} for SD2 or "
        f"{_SDXL_OPEN_CLIP_PROBE!r} for SDXL); expected a full SD1.x/SD2.x/SDXL checkpoint"
    )


def _resolve_variant(
    family: str, variant: str | None, path: Path, prediction: str | None = None
) -> str:
    """The shipped config to use: ``variant`` if given, else SD1 -> ``sd15``, SDXL -> ``sdxl``; SD2
    -> by the recorded prediction type (v -> ``sd21``, epsilon -> ``sd21-base``), which the weights
    cannot tell."""
    if variant is None:
        if family != "sd2":
            return VARIANTS_BY_FAMILY[family][0]
        if prediction is None:
            raise BackboneLoadError(
                f"{path}: SD2.x weights do not say whether this is the 768 px v-prediction "
                "or the 512 px epsilon model and the file records no prediction type: "
                "set model.variant=sd21 (768, v) or model.variant=sd21-base (512, epsilon) "
                "(--variant for generate/evaluate)"
            )
        return SD2_VARIANT_BY_PREDICTION[prediction]
    config_dir(variant)  # validates the name
    if variant not in VARIANTS_BY_FAMILY[family]:
        raise BackboneLoadError(
            f"{path}: holds {family.upper()} weights but variant={variant!r} was requested"
        )
    return variant


def _check_architecture(
    state_dict: dict[str, Tensor], unet_config: dict[str, Any], path: Path
) -> None:
    """Fail early, in one line, when the weights do not fit the UNet config (inpainting, other
    context dim)."""
    in_channels = state_dict[_UNET_PROBE].shape[1]
    if in_channels != unet_config["in_channels"]:
        raise BackboneLoadError(
            f"{path}: UNet takes {in_channels} input channels (an inpainting/depth model?); "
            f"expected {unet_config['in_channels']}"
        )
    to_k = next((v for k, v in state_dict.items() if _CROSS_ATTN_KEY.fullmatch(k)), None)
    if to_k is not None and to_k.shape[1] != unet_config["cross_attention_dim"]:
        raise BackboneLoadError(
            f"{path}: UNet cross-attention context dim is {to_k.shape[1]}; "
            f"expected {unet_config['cross_attention_dim']} for this config"
        )


def _check_weights_complete(
    state_dict: dict[str, Tensor], configs: Path, family: str, path: Path
) -> None:
    """Convert the keys with diffusers' converters and check every parameter of each component is
    there.

    diffusers loads single files with ``strict=False``; a checkpoint with a tensor missing would
    otherwise fail later with an unrelated message (or keep an uninitialised weight). The models are
    built on the meta device, so this costs no memory.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(folder: str) -> CLIPTextConfig:
        return CLIPTextConfig.from_pretrained(str(configs / folder), local_files_only=True)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(configs / "unet"))
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae")))
        text = CLIPTextModel(text_config("text_encoder"))
        text_2 = (
            CLIPTextModelWithProjection(text_config("text_encoder_2")) if family == "sdxl" else None
        )
    if family == "sd1":
        text_sd = convert_ldm_clip_checkpoint(state_dict)
    elif family == "sd2":
        text_sd = convert_open_clip_checkpoint(text, state_dict)
    else:
        text_sd = convert_ldm_clip_checkpoint(_with_prefix(state_dict, SDXL_CLIP_PREFIX))
    components = [
        ("UNet", unet, convert_ldm_unet_checkpoint(state_dict, dict(unet.config))),
        ("VAE", vae, convert_ldm_vae_checkpoint(state_dict, dict(vae.config))),
        ("text encoder", text, text_sd),
    ]
    if text_2 is not None:
        text_2_sd = convert_open_clip_checkpoint(
            text_2, state_dict, prefix=SDXL_OPEN_CLIP_PREFIX + "model."
        )
        components.append(("second text encoder (OpenCLIP bigG)", text_2, text_2_sd))
    for component, model, converted in components:
        # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); accept both.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()} | converted
        missing = sorted(k for k in model.state_dict() if converted.get(k) is None)
        if missing:
            raise BackboneLoadError(
                f"{path}: {component} weights incomplete, {len(missing)} tensors missing "
                f"(e.g. {missing[0]!r}); expected a full {family.upper()} checkpoint"
            )


def _with_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (same tensors): one SDXL text encoder's weights, so that
    diffusers' converter cannot mistake one encoder for the other when both are the same width."""
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_clip_tokenizer(tokenizer_dir: str | Path) -> Any:
    """A ``CLIPTokenizer`` from a settings-only ``tokenizer/`` folder plus the shipped BPE
    vocabulary.

    Falls back to the folder's own ``vocab.json``/``merges.txt`` when it has them.
    """
    from transformers import CLIPTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    files = {}
    if not (tokenizer_dir / "vocab.json").is_file():
        files = {
            "vocab": str(CLIP_BPE_DIR / "vocab.json"),
            "merges": str(CLIP_BPE_DIR / "merges.txt"),
        }
    return CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, **files)


def load_single_file_components(
    path: str | Path,
    *,
    variant: str | None = None,
    config_dir_override: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Build ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``noise_scheduler`` from one SD
    file; for SDXL also ``text_encoder_2`` (OpenCLIP bigG, ``CLIPTextModelWithProjection``) and
    ``tokenizer_2``.

    ``variant`` is ``"sd15"``, ``"sd21"`` (768 px, v-prediction), ``"sd21-base"`` (512 px,
    epsilon) or ``"sdxl"``. Without it, SD1 weights give ``"sd15"`` and SDXL base weights
    ``"sdxl"``; SD2 weights need the prediction type recorded
    in the file (safetensors metadata ``modelspec.prediction_type`` / ``ss_v_parameterization``,
    or a ``prediction_type`` / ``parameterization`` entry of a pickled checkpoint), else this
    raises asking for the variant. A recorded prediction type also sets the scheduler's
    ``prediction_type`` (e.g. an SD1.5 v-prediction fine-tune); an explicit ``variant`` wins.
    ``config_dir_override`` points at another diffusers-layout config folder (e.g. a scaled-down
    test architecture, its scheduler config then decides); the family is still checked.
    Raises :class:`BackboneLoadError` (a ``ValueError``) naming the path and what was expected.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    state_dict, records = read_state_dict(path, what="Stable Diffusion", error=BackboneLoadError)
    family = detect_family(state_dict, path)
    prediction = recorded_prediction_type(records) if variant is None else None
    if config_dir_override is not None:
        _resolve_variant(family, variant or VARIANTS_BY_FAMILY[family][0], path)  # family check
        configs = Path(config_dir_override)
        chosen = variant or configs.name
    else:
        chosen = _resolve_variant(family, variant, path, prediction)
        configs = config_dir(chosen)
    unet_config = json.loads((configs / "unet" / "config.json").read_text())
    _check_architecture(state_dict, unet_config, path)

    try:
        _check_weights_complete(state_dict, configs, family, path)
        common = {"config": str(configs), "local_files_only": True, "torch_dtype": torch_dtype}
        unet = UNet2DConditionModel.from_single_file(state_dict, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(state_dict, subfolder="vae", **common)
        if family == "sdxl":
            # Each encoder from its own keys: diffusers tells them apart by width otherwise.
            text_encoder = create_diffusers_clip_model_from_ldm(
                CLIPTextModel,
                _with_prefix(state_dict, SDXL_CLIP_PREFIX),
                subfolder="text_encoder",
                **common,
            )
            sdxl_parts = {
                "text_encoder_2": create_diffusers_clip_model_from_ldm(
                    CLIPTextModelWithProjection,
                    _with_prefix(state_dict, SDXL_OPEN_CLIP_PREFIX),
                    subfolder="text_encoder_2",
                    **common,
                ),
                "tokenizer_2": load_clip_tokenizer(configs / "tokenizer_2"),
            }
        else:
            text_encoder = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state_dict, subfolder="text_encoder", **common
            )
            sdxl_parts = {}
    except BackboneLoadError:
        raise
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches and converter failures
        raise BackboneLoadError(
            f"{path}: weights do not fit the {chosen} architecture: {first_line(exc)}"
        ) from exc

    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer(configs / "tokenizer"),
        "noise_scheduler": _scheduler(configs, prediction),
        **sdxl_parts,
    }


def _scheduler(configs: Path, prediction: str | None) -> Any:
    """The config folder's training scheduler, with the file's recorded prediction type if any."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(
        str(configs), subfolder="scheduler", local_files_only=True
    )
    if prediction is not None and scheduler.config.prediction_type != prediction:
        scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction)
    return scheduler
