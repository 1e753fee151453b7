"""Loading Stable Diffusion from one original-format file, offline.

Tiny diffusers/transformers models are written out in the original LDM key layout (UNet with the
package's ``unet_to_original``; VAE and text encoders with the small test-only converters below,
mirrors of diffusers' forward converters), saved as ``.safetensors``/``.ckpt`` and loaded back
through ``load_single_file_components``: every tensor must come back bit for bit.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from cn_lightning.errors import BackboneLoadError, CnLightningError  # noqa: E402
from cn_lightning.models.convert_original import unet_to_original  # noqa: E402
from cn_lightning.models.single_file import (  # noqa: E402
    CLIP_BPE_DIR,
    CONFIG_ROOT,
    config_dir,
    detect_family,
    load_clip_tokenizer,
    load_single_file_components,
)

# ------------------------------------------------------------ test-only diffusers -> LDM converters

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(sd: dict[str, Tensor], n_blocks: int) -> dict[str, Tensor]:
    """Inverse of diffusers' convert_ldm_vae_checkpoint (attention linears become 1x1 convs)."""
    out = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace(
            ".mid_block.resnets.0.", ".mid.block_1."
        )
        k = k.replace(".mid_block.resnets.1.", ".mid.block_2.")
        if ".mid_block.attentions.0." in k:
            k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for new, old in _VAE_ATTN.items():
                k = k.replace(f".{new}.", f".{old}.")
            if value.ndim == 2:
                value = value[:, :, None, None]
        if k.startswith("encoder.down_blocks."):
            _, _, i, kind, *rest = k.split(".")
            k = f"encoder.down.{i}." + (
                f"block.{'.'.join(rest)}" if kind == "resnets" else "downsample.conv." + rest[-1]
            )
        if k.startswith("decoder.up_blocks."):
            _, _, i, kind, *rest = k.split(".")
            b = n_blocks - 1 - int(i)
            k = f"decoder.up.{b}." + (
                f"block.{'.'.join(rest)}" if kind == "resnets" else "upsample.conv." + rest[-1]
            )
        for new, old in _VAE_RESNET.items():
            k = k.replace(new, old)
        out["first_stage_model." + k] = value
    return out


def clip_to_ldm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """SD1 layout: the HF CLIPTextModel under ``cond_stage_model.transformer.text_model.``."""
    return {
        "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
        for k, v in sd.items()
    }


def open_clip_to_ldm(sd: dict[str, Tensor], n_layers: int, proj_dim: int) -> dict[str, Tensor]:
    """SD2 layout: OpenCLIP text tower under ``cond_stage_model.model.``, with fused qkv, one extra
    unused last block (SD2 reads the penultimate layer) and a text projection, as in real files."""
    p = "cond_stage_model.model."
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    width = out[p + "ln_final.weight"].shape[0]
    out[p + "text_projection"] = torch.randn(width, proj_dim)
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in range(n_layers + 1):
        src, dst = f"encoder.layers.{min(i, n_layers - 1)}.", f"{p}transformer.resblocks.{i}."
        block = {}
        for kind in ("weight", "bias"):
            block[f"attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            )
            block[f"attn.out_proj.{kind}"] = sd[f"{src}self_attn.out_proj.{kind}"]
            for hf, oc in names.items():
                block[f"{oc}.{kind}"] = sd[f"{src}{hf}.{kind}"]
        unused = i == n_layers  # the extra last block gets its own random values
        out |= {dst + k: torch.randn_like(v) if unused else v for k, v in block.items()}
    return out


# ---------------------------------------------------------------- tiny models and config folders

TINY_UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
    "sample_size": 8,
}
TINY_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
}
TINY_TEXT = {
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 49408,
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere (zero-initialised layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_tiny_sd(tmp_path: Path, family: str) -> tuple[Path, dict[str, torch.nn.Module], Path]:
    """Tiny SD of ``family`` ("sd1"/"sd2"): original-format checkpoint, source models, config
    folder."""
    sd2 = family == "sd2"
    base = config_dir("sd21" if sd2 else "sd15")
    cfg_dir = tmp_path / f"tiny-{family}"
    shutil.copytree(base, cfg_dir)
    hidden = 32 if sd2 else 16
    unet_cfg = {
        **json.loads((base / "unet/config.json").read_text()),
        **TINY_UNET,
        "cross_attention_dim": hidden,
    }
    if sd2:
        unet_cfg["attention_head_dim"] = [2, 4]
    vae_cfg = {**json.loads((base / "vae/config.json").read_text()), **TINY_VAE}
    text_cfg = {
        **json.loads((base / "text_encoder/config.json").read_text()),
        **TINY_TEXT,
        "hidden_size": hidden,
    }
    for name, cfg in (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_cfg)):
        (cfg_dir / name / "config.json").write_text(json.dumps(cfg))

    unet = _randomize(UNet2DConditionModel.from_config(unet_cfg), 0)
    vae = _randomize(AutoencoderKL.from_config(vae_cfg), 1)
    text = _randomize(
        CLIPTextModel(
            CLIPTextConfig(**{k: v for k, v in text_cfg.items() if k != "architectures"})
        ),
        2,
    )
    ckpt = unet_to_original(unet.state_dict(), unet.config)
    ckpt |= vae_to_ldm(vae.state_dict(), len(vae_cfg["block_out_channels"]))
    text_sd = text.state_dict()
    ckpt |= (
        open_clip_to_ldm(text_sd, TINY_TEXT["num_hidden_layers"], 8)
        if sd2
        else clip_to_ldm(text_sd)
    )
    path = tmp_path / f"tiny-{family}.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    return path, {"unet": unet, "vae": vae, "text_encoder": text}, cfg_dir


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------- loading round trips


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_checkpoint_loads_bit_identical(tmp_path: Path, family: str) -> None:
    path, source, cfg_dir = make_tiny_sd(tmp_path, family)
    comps = load_single_file_components(path, config_dir_override=cfg_dir)
    assert set(comps) == {"unet", "vae", "text_encoder", "tokenizer", "noise_scheduler"}
    for name, model in source.items():
        assert_same_weights(model, comps[name])
    expected_pred = "v_prediction" if family == "sd2" else "epsilon"
    assert comps["noise_scheduler"].config.prediction_type == expected_pred
    assert comps["tokenizer"].pad_token_id == (0 if family == "sd2" else 49407)
    # The loaded parts run together: encode a prompt, denoise one step.
    ids = comps["tokenizer"](
        ["a cat"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ctx = comps["text_encoder"](ids)[0]
        out = comps["unet"](torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=ctx).sample
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_variant_override_and_pickle_checkpoint(tmp_path: Path) -> None:
    path, source, cfg_dir = make_tiny_sd(tmp_path, "sd2")
    from safetensors.torch import load_file

    ckpt_path = tmp_path / "tiny.ckpt"
    torch.save(
        {"state_dict": load_file(str(path)), "global_step": 3}, ckpt_path
    )  # Lightning-style wrapper
    # The sd21-base scheduler (epsilon) is chosen by name; the tiny architecture by the override.
    scheduler_dir = cfg_dir / "scheduler"
    shutil.copy(config_dir("sd21-base") / "scheduler/scheduler_config.json", scheduler_dir)
    comps = load_single_file_components(ckpt_path, variant="sd21-base", config_dir_override=cfg_dir)
    assert comps["noise_scheduler"].config.prediction_type == "epsilon"
    assert_same_weights(source["unet"], comps["unet"])
    with pytest.raises(BackboneLoadError, match="SD2 weights but variant='sd15'"):
        load_single_file_components(ckpt_path, variant="sd15", config_dir_override=cfg_dir)


def test_shipped_variants_scheduler_and_sizes() -> None:
    def cfg(variant: str, name: str) -> dict:
        sub = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
        return json.loads((config_dir(variant) / sub).read_text())

    assert cfg("sd15", "scheduler")["prediction_type"] == "epsilon"
    assert cfg("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert cfg("sd21-base", "scheduler")["prediction_type"] == "epsilon"
    assert (cfg("sd15", "unet")["sample_size"], cfg("sd21", "unet")["sample_size"]) == (64, 96)
    assert cfg("sd15", "unet")["use_linear_projection"] is False
    assert cfg("sd21", "unet")["use_linear_projection"] is True
    assert (
        cfg("sd21", "text_encoder")["hidden_size"]
        == cfg("sd21", "unet")["cross_attention_dim"]
        == 1024
    )
    assert (
        cfg("sd15", "text_encoder")["hidden_size"]
        == cfg("sd15", "unet")["cross_attention_dim"]
        == 768
    )
    for variant in ("sd15", "sd21", "sd21-base"):
        index = json.loads((config_dir(variant) / "model_index.json").read_text())
        assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


# ------------------------------------------------------ real SD1.5 / SD2.1 key layout (meta device)


@pytest.mark.parametrize(("variant", "expected_type"), [("sd15", "v1"), ("sd21", "v2")])
def test_full_size_layout_matches_diffusers_converters(variant: str, expected_type: str) -> None:
    """The shipped configs, written in LDM layout, are recognised and fully mapped back by
    diffusers."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    unet_cfg = json.loads((config_dir(variant) / "unet/config.json").read_text())
    vae_cfg = json.loads((config_dir(variant) / "vae/config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
    ldm = unet_to_original(unet.state_dict(), unet.config) | vae_to_ldm(vae.state_dict(), 4)
    # Known keys/shapes of the real original checkpoints.
    assert ldm["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (
        320,
        640,
        1,
        1,
    )
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert ldm["model.diffusion_model.input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    proj_in = ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape
    assert proj_in == ((320, 320) if variant == "sd21" else (320, 320, 1, 1))
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    # diffusers' own model-type detection needs a text-encoder key too.
    probe = (
        "cond_stage_model.model.token_embedding.weight"
        if variant == "sd21"
        else ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight")
    )
    assert (
        infer_diffusers_model_type(ldm | {probe: torch.empty(77, 768, device="meta")})
        == expected_type
    )
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(ldm, dict(model.config))
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in back.items()} == shapes


# ---------------------------------------------------------------- errors


def test_missing_path_is_a_one_line_backbone_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneLoadError) as info:
        load_single_file_components(missing)
    message = str(info.value)
    assert str(missing) in message and "\n" not in message and ".safetensors" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, CnLightningError)


def test_non_sd_files_are_rejected_with_the_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    not_sd = tmp_path / "controlnet.safetensors"
    save_file({"control_model.time_embed.0.weight": torch.zeros(2, 2)}, str(not_sd))
    with pytest.raises(
        BackboneLoadError, match="not an original-format Stable Diffusion checkpoint"
    ) as info:
        load_single_file_components(not_sd)
    assert str(not_sd) in str(info.value)

    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(BackboneLoadError, match="cannot read it as a checkpoint") as info:
        load_single_file_components(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)

    wrong_suffix = tmp_path / "weights.txt"
    wrong_suffix.write_text("x")
    with pytest.raises(BackboneLoadError, match=r"expected a checkpoint file ending in"):
        load_single_file_components(wrong_suffix)

    with pytest.raises(BackboneLoadError, match="unknown Stable Diffusion variant"):
        config_dir("sd3")


def test_sdxl_and_inpainting_are_named(tmp_path: Path) -> None:
    base = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
    }
    with pytest.raises(BackboneLoadError, match="SDXL"):
        detect_family(
            base | {"conditioner.embedders.0.transformer.x": torch.zeros(1)}, "x.safetensors"
        )

    from safetensors.torch import save_file

    path, _, cfg_dir = make_tiny_sd(tmp_path, "sd1")
    from safetensors.torch import load_file

    ckpt = load_file(str(path))
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 9, 3, 3)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file(ckpt, str(inpaint))
    with pytest.raises(BackboneLoadError, match="9 input channels"):
        load_single_file_components(inpaint, config_dir_override=cfg_dir)

    del ckpt["model.diffusion_model.out.2.weight"]
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    partial = tmp_path / "partial.safetensors"
    save_file(ckpt, str(partial))
    with pytest.raises(BackboneLoadError, match="UNet weights incomplete"):
        load_single_file_components(partial, config_dir_override=cfg_dir)


# ---------------------------------------------------------------- tokenizer


def _open_clip_simple_tokenizer():
    """open_clip's SimpleTokenizer, loaded from its file so open_clip's torchvision import is
    skipped."""
    location = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", Path(location) / "tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


# No curly quotes (open_clip runs ftfy, HF's CLIPTokenizer does not) and no "!" (SD2's pad token
# "!" is a special token in HF tokenizers, as in the public SD2 tokenizer).
PROMPTS = [
    "a photo of a cat",
    "A  Photograph of an ASTRONAUT riding a horse, 4k, trending on artstation",
    "café naïve 123,456 don't <tag> x-ray",
    "",
    "word " * 100,  # truncated to 77 with EOS last
]


@pytest.mark.parametrize("variant", ["sd15", "sd21"])
def test_tokenizer_matches_open_clip(variant: str) -> None:
    reference = _open_clip_simple_tokenizer()
    tokenizer = load_clip_tokenizer(config_dir(variant) / "tokenizer")
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
    pad = 0 if variant == "sd21" else 49407
    for prompt in PROMPTS:
        expected = reference(prompt)[0].tolist()  # pads with 0
        end = expected.index(49407)
        expected = expected[: end + 1] + [pad] * (76 - end)
        got = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert got == expected, prompt
        assert got[0] == 49406


def test_shipped_bpe_files_are_open_clip_vocabulary() -> None:
    """vocab.json/merges.txt are exactly what open_clip's bundled BPE file defines."""
    location = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(Path(location) / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    shipped = (CLIP_BPE_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert shipped[0].startswith("#version") and shipped[1:-1] == merges
    vocab = json.loads((CLIP_BPE_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert (
        len(vocab) == 49408
        and vocab["<|startoftext|>"] == 49406
        and vocab["<|endoftext|>"] == 49407
    )
    assert vocab["".join(merges[0].split())] == 512  # merges follow the 2 x 256 byte tokens
    assert CONFIG_ROOT in CLIP_BPE_DIR.parents


# ---------------------------------------------------------------- full size (slow)


@pytest.mark.slow
def test_full_size_sd15_round_trip(tmp_path: Path) -> None:
    """Random-weight SD1.5 at full size (~1 B parameters) through a real .safetensors file."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    root = config_dir("sd15")
    unet = UNet2DConditionModel.from_config(
        json.loads((root / "unet/config.json").read_text())
    ).half()
    vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text())).half()
    text_cfg = {
        k: v for k, v in json.loads((root / "text_encoder/config.json").read_text()).items()
    }
    text = CLIPTextModel(CLIPTextConfig(**text_cfg)).half()
    ckpt = unet_to_original(unet.state_dict(), unet.config) | vae_to_ldm(vae.state_dict(), 4)
    ckpt |= clip_to_ldm(text.state_dict())
    path = tmp_path / "sd15.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    del ckpt
    comps = load_single_file_components(path, torch_dtype=torch.float16)
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        assert_same_weights(model, comps[name])
