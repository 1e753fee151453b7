"""Fingerprints of frozen backbone parts: which text encoder(s) and VAE made a cache.

``data_prep.cache_latents`` records them in the cache's manifest and text cache file, and
``ControlNetModule`` compares them with those of the backbone it loaded before training on the
cache, so latents or text embeddings made with another model are refused instead of silently
trained on.

A fingerprint is ``sha256:`` and 16 hex digits of a SHA-256 over, per module in order: its class
name and, for every parameter (in the module's own order), the name, the shape and the values
rounded to float16 of at most ``SAMPLE`` of its elements, evenly strided (all of them for
smaller tensors); and per tokenizer its vocabulary, BPE merges, maximum length and special
tokens. Why a sample and float16:

* cheap at any size: 0.4 s on a 2-core CPU for SDXL's two text encoders and tokenizers (817 M
  parameters, 3.3 GB in float32, whose full hash would take several seconds at SHA-256's
  ~1 GB/s), 0.2 s for SD1.5's, 0.03 s for a VAE, so the training module computes them every
  time it loads a backbone;
* still sensitive to any realistic change: another model differs in shapes or in almost every
  value, a fine-tuned one in almost every value, and the stride is shorter than a row of the
  token embedding (579 elements for 49408 x 768), so every token's row is sampled (a textual
  inversion that overwrites one token changes the fingerprint);
* the same for the same weights in float32 or float16 files (float16 -> float32 -> float16 is
  exact), from a diffusers folder or a single-file checkpoint (the same parameter names once
  loaded), so only the weights themselves count. It is taken from the weights as loaded in
  float32, before any cast to ``model.frozen_dtype``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

SAMPLE = 1 << 16  # elements hashed per tensor at most
DIGITS = 16


def module_digest(h, module: torch.nn.Module) -> None:
    """Add ``module``'s class, parameter names, shapes and sampled values to hash ``h``."""
    h.update(f"module {type(module).__name__}\n".encode())
    for name, param in module.named_parameters():
        flat = param.detach().reshape(-1)
        n = flat.numel()
        if n > SAMPLE:
            flat = flat[:: -(-n // SAMPLE)]
        h.update(f"{name} {tuple(param.shape)}\n".encode())
        h.update(flat.to("cpu", torch.float16).contiguous().numpy().tobytes())


def tokenizer_digest(h, tokenizer) -> None:
    """Add a tokenizer's vocabulary, merges, length and special tokens to hash ``h``."""
    merges = getattr(tokenizer, "bpe_ranks", None)
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "merges": sorted(((" ".join(k), v) for k, v in merges.items()), key=lambda kv: kv[1])
        if merges
        else None,
        "model_max_length": int(tokenizer.model_max_length),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "lowercase": getattr(tokenizer, "do_lower_case", None),
    }
    h.update(json.dumps(state, sort_keys=True).encode())


def fingerprint(modules: Iterable[torch.nn.Module], tokenizers: Iterable = ()) -> str:
    """``sha256:<16 hex>`` of ``modules`` and ``tokenizers`` (see the module docstring)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for module in modules:
            module_digest(h, module)
    for tokenizer in tokenizers:
        tokenizer_digest(h, tokenizer)
    return "sha256:" + h.hexdigest()[:DIGITS]


def text_fingerprint(tokenizers: Iterable, text_encoders: Iterable[torch.nn.Module]) -> str:
    """The fingerprint of a backbone's prompt encoding: its text encoder(s) and tokenizer(s)."""
    return fingerprint([m for m in text_encoders if m is not None], [t for t in tokenizers if t])


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """The fingerprint of a VAE's weights."""
    return fingerprint([vae])
