"""Loading SDXL from one original-format (Stability ``sgm``) file, offline.

The tiny SDXL pipeline (``python -m cn_lightning.models.tiny --preset sdxl-test``) is written out
in the original key layout of ``sd_xl_base_1.0.safetensors``: the UNet with the package's
``unet_to_original``, the VAE with the test-only ``vae_to_ldm`` of tests/test_single_file.py, CLIP
ViT-L under ``conditioner.embedders.0.transformer.`` and OpenCLIP bigG (fused qkv, text
projection) under ``conditioner.embedders.1.model.`` with the converter below, the exact inverse
of diffusers' ``convert_open_clip_checkpoint``. The file is loaded back through the product's
``load_single_file_components`` with the tiny directory as the config folder (as the SD tiny
tests do: the tiny sizes are not SDXL's), and every component must hold the same tensors and give
the same outputs as the diffusers directory, up to a whole SDXL pipeline's image.

The shipped ``configs/sdxl`` folder (real SDXL base 1.0 sizes) is checked on the meta device: its
models, in the original layout, have the shapes of the real file's known keys, diffusers' own
detection calls them ``xl_base``, and the loader's completeness check maps every tensor back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from test_single_file import (  # noqa: E402
    PROMPTS,
    _open_clip_simple_tokenizer,
    assert_same_weights,
    vae_to_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from cn_lightning.errors import BackboneLoadError  # noqa: E402
from cn_lightning.models.backbone import Backbone  # noqa: E402
from cn_lightning.models.convert_original import unet_to_original  # noqa: E402
from cn_lightning.models.single_file import (  # noqa: E402
    _check_weights_complete,
    config_dir,
    detect_family,
    load_clip_tokenizer,
    load_single_file_components,
    variant_for_cross_attention,
)
from cn_lightning.models.tiny import main as tiny_main  # noqa: E402

CLIP_L = "conditioner.embedders.0.transformer."
BIG_G = "conditioner.embedders.1.model."
PROMPT = "red circle with blue background"

# ----------------------------------------------------- test-only diffusers -> sgm text converters


def clip_l_to_sgm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP ViT-L: the HF CLIPTextModel as it is, under ``conditioner.embedders.0.transformer.``."""
    return {CLIP_L + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}


_OPEN_CLIP_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def big_g_to_sgm(sd: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """OpenCLIP bigG from an HF ``CLIPTextModelWithProjection``: fused ``in_proj`` (q, k, v), the
    projection as OpenCLIP's ``x @ text_projection`` matrix (the transposed HF linear weight).
    Exact inverse of diffusers' ``convert_open_clip_checkpoint``; every layer is used (SDXL reads
    the penultimate hidden states and the pooled, projected last one)."""
    t = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        BIG_G + "token_embedding.weight": t["embeddings.token_embedding.weight"],
        BIG_G + "positional_embedding": t["embeddings.position_embedding.weight"],
        BIG_G + "ln_final.weight": t["final_layer_norm.weight"],
        BIG_G + "ln_final.bias": t["final_layer_norm.bias"],
        BIG_G + "text_projection": t["text_projection.weight"].T.contiguous(),
    }
    for i in range(n_layers):
        src, dst = f"encoder.layers.{i}.", f"{BIG_G}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [t[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            )
            for hf, oc in _OPEN_CLIP_NAMES.items():
                out[f"{dst}{oc}.{kind}"] = t[f"{src}{hf}.{kind}"]
    assert len(out) == 5 + 12 * n_layers
    return out


def sdxl_to_sgm(unet, vae, text_encoder, text_encoder_2) -> dict[str, Tensor]:
    """A whole SDXL base model in the layout of Stability's single-file checkpoints."""
    ckpt = unet_to_original(unet.state_dict(), unet.config)
    ckpt |= vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    ckpt |= clip_l_to_sgm(text_encoder.state_dict())
    ckpt |= big_g_to_sgm(text_encoder_2.state_dict(), text_encoder_2.config.num_hidden_layers)
    return ckpt


# ---------------------------------------------------------------- the tiny SDXL, as one file


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> tuple[Path, Path, StableDiffusionXLPipeline]:
    """(tiny diffusers SDXL directory, the same model as one .safetensors, its pipeline)."""
    tmp = tmp_path_factory.mktemp("sdxl_single")
    folder = tmp / "tiny_sdxl"
    assert tiny_main(["--preset", "sdxl-test", "--out", str(folder)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    # Random values everywhere: the tiny model's zero-initialised layers would hide mapping errors.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pipe.save_pretrained(folder, safe_serialization=True)
    ckpt = sdxl_to_sgm(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    path = tmp / "tiny_sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    return folder, path, pipe


def test_sdxl_single_file_loads_as_the_diffusers_directory(tiny_sdxl) -> None:
    folder, path, pipe = tiny_sdxl
    assert detect_family(load_file(str(path)), path) == "sdxl"
    comps = load_single_file_components(path, config_dir_override=folder)
    assert set(comps) == {
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "noise_scheduler",
    }
    assert isinstance(comps["text_encoder_2"], CLIPTextModelWithProjection)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(pipe, name), comps[name])
    assert comps["vae"].config.scaling_factor == pipe.vae.config.scaling_factor == 0.13025
    assert comps["noise_scheduler"].config.prediction_type == "epsilon"
    assert Backbone(**comps).is_sdxl  # what load_backbone builds from these parts

    # The same outputs, component by component.
    ids = [pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids]
    ids.append(pipe.tokenizer_2(PROMPT, padding="max_length", return_tensors="pt").input_ids)
    for tok, ref in ((comps["tokenizer"], ids[0]), (comps["tokenizer_2"], ids[1])):
        assert torch.equal(tok(PROMPT, padding="max_length", return_tensors="pt").input_ids, ref)
    g = torch.Generator().manual_seed(1)
    latents, image = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        h1 = comps["text_encoder"](ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = comps["text_encoder_2"](ids[1], output_hidden_states=True)
        ref1 = pipe.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        ref2 = pipe.text_encoder_2(ids[1], output_hidden_states=True)
        assert torch.equal(h1, ref1)
        assert torch.equal(out2.hidden_states[-2], ref2.hidden_states[-2])
        assert torch.equal(out2.text_embeds, ref2.text_embeds)
        context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
        added = {"text_embeds": out2.text_embeds, "time_ids": time_ids}
        unet_args = (latents, torch.tensor([500]), context)
        eps = comps["unet"](*unet_args, added_cond_kwargs=added).sample
        assert torch.equal(eps, pipe.unet(*unet_args, added_cond_kwargs=added).sample)
        outs = [
            (vae.encode(image * 2 - 1).latent_dist.mean, vae.decode(latents).sample)
            for vae in (comps["vae"], pipe.vae)
        ]
        assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))

    # A whole SDXL pipeline built from the loaded parts draws the directory's image.
    loaded = StableDiffusionXLPipeline(scheduler=pipe.scheduler, **comps_without_scheduler(comps))
    kwargs = {"num_inference_steps": 1, "height": 32, "width": 32, "output_type": "np"}
    a = loaded(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 32, 32, 3) and (a == b).all()


def comps_without_scheduler(comps: dict) -> dict:
    return {k: v for k, v in comps.items() if k != "noise_scheduler"}


def test_sdxl_single_file_errors(tiny_sdxl, tmp_path: Path) -> None:
    folder, path, _ = tiny_sdxl
    ckpt = load_file(str(path))
    with pytest.raises(BackboneLoadError, match="holds SDXL weights but variant='sd15'"):
        load_single_file_components(path, variant="sd15", config_dir_override=folder)

    # A tensor of the second text encoder missing: named, in one line, before diffusers'
    # non-strict loading would keep a random weight.
    partial = dict(ckpt)
    del partial[BIG_G + "transformer.resblocks.1.mlp.c_fc.weight"]
    partial_path = tmp_path / "partial.safetensors"
    save_file(partial, str(partial_path))
    with pytest.raises(
        BackboneLoadError, match="second text encoder .* weights incomplete"
    ) as info:
        load_single_file_components(partial_path, config_dir_override=folder)
    assert "\n" not in str(info.value) and str(partial_path) in str(info.value)

    # Only one of the two text encoders, or the refiner's layout: said, not mis-loaded.
    only_clip_l = {k: v for k, v in ckpt.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(BackboneLoadError, match="SDXL checkpoint but has no .*embedders.1"):
        detect_family(only_clip_l, "x.safetensors")
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in ckpt.items()
        if not k.startswith(CLIP_L)
    }
    with pytest.raises(BackboneLoadError, match="SDXL refiner"):
        detect_family(refiner, "refiner.safetensors")

    # Config folder of another width: a one-line error naming the architecture.
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / "text_encoder_2/config.json").read_text())
    (wrong / "text_encoder_2/config.json").write_text(json.dumps(cfg | {"hidden_size": 64}))
    with pytest.raises(BackboneLoadError, match="weights do not fit the sdxl architecture"):
        load_single_file_components(path, variant="sdxl", config_dir_override=wrong)


# ---------------------------------------------------------------- the shipped SDXL base configs


def _shipped(name: str) -> dict:
    sub = "scheduler/scheduler_config.json" if name == "scheduler" else f"{name}/config.json"
    return json.loads((config_dir("sdxl") / sub).read_text())


def test_shipped_sdxl_configs_have_the_real_sizes_and_layout() -> None:
    """The real SDXL base 1.0 architecture, in the layout of ``sd_xl_base_1.0.safetensors``."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    def text(cls, name: str):
        return cls(CLIPTextConfig.from_pretrained(str(config_dir("sdxl") / name)))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_shipped("unet"))
        vae = AutoencoderKL.from_config(_shipped("vae"))
        text_encoder = text(CLIPTextModel, "text_encoder")
        text_encoder_2 = text(CLIPTextModelWithProjection, "text_encoder_2")
        controlnet = ControlNetModel.from_unet(unet)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # SDXL base 1.0: 2.567 B UNet, 695 M OpenCLIP bigG, 123 M CLIP ViT-L; its ControlNet 1.251 B.
    assert count(unet) == 2_567_463_684
    assert count(text_encoder_2) == 694_659_840 and count(text_encoder) == 123_060_480
    assert count(vae) == 83_653_863
    assert count(controlnet) == 1_251_014_160
    assert unet.config.cross_attention_dim == 768 + 1280
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + 1280
    assert _shipped("vae")["scaling_factor"] == 0.13025
    assert _shipped("scheduler")["_class_name"] == "EulerDiscreteScheduler"
    assert _shipped("scheduler")["prediction_type"] == "epsilon"
    index = json.loads((config_dir("sdxl") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder_2", "tokenizer_2"} <= set(index)
    # The ControlNet config that exports of checkpoints over a single-file base fall back to.
    assert variant_for_cross_attention(2048) == "sdxl"
    shipped_cn = json.loads((config_dir("sdxl") / "controlnet/config.json").read_text())
    from_unet = json.loads(json.dumps(dict(controlnet.config)))
    assert {k: v for k, v in shipped_cn.items() if not k.startswith("_")} == {
        k: v for k, v in from_unet.items() if not k.startswith("_")
    }

    ckpt = sdxl_to_sgm(unet, vae, text_encoder, text_encoder_2)
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    # Keys and shapes of the real sd_xl_base_1.0.safetensors.
    d = "model.diffusion_model."
    assert shapes[d + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[d + "input_blocks.4.1.proj_in.weight"] == (640, 640)  # linear projections
    assert shapes[d + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[d + "middle_block.1.transformer_blocks.9.ff.net.2.weight"] == (1280, 5120)
    assert shapes[d + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[d + "output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes[BIG_G + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[BIG_G + "text_projection"] == (1280, 1280)
    assert shapes[BIG_G + "positional_embedding"] == (77, 1280)
    assert shapes[CLIP_L + "text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert sum(k.startswith(d) for k in ckpt) == 1680
    assert infer_diffusers_model_type(ckpt) == "xl_base"
    assert detect_family(ckpt) == "sdxl"
    # The loader's converters map every tensor of every component back.
    _check_weights_complete(ckpt, config_dir("sdxl"), "sdxl", Path("sd_xl_base_1.0.safetensors"))


@pytest.mark.parametrize(("folder", "pad"), [("tokenizer", 49407), ("tokenizer_2", 0)])
def test_shipped_sdxl_tokenizers_match_open_clip(folder: str, pad: int) -> None:
    """SDXL's two tokenizers: the same BPE, padded with <|endoftext|> and with "!" (id 0)."""
    reference = _open_clip_simple_tokenizer()
    tokenizer = load_clip_tokenizer(config_dir("sdxl") / folder)
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408
    assert tokenizer.pad_token_id == pad
    for prompt in PROMPTS:
        expected = reference(prompt)[0].tolist()
        end = expected.index(49407)
        expected = expected[: end + 1] + [pad] * (76 - end)
        got = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert got == expected, prompt
