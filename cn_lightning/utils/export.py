"""Write the trained control branch as a diffusers ``ControlNetModel`` folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from diffusers import ControlNetModel


def save_controlnet_folder(controlnet: ControlNetModel, out: str | os.PathLike) -> Path:
    """Save ``controlnet`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) atomically.

    The folder is written next to ``out`` and renamed into place, so ``out`` is either the old
    export or the complete new one, never a mix.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
