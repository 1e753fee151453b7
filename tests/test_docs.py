"""The commands and snippets in README.md and docs/*.md, checked and run.

Annotation scheme: every fenced ```bash / ```sh / ```console / ```python block carries a class
as the second word of its info string, e.g. ```bash runnable (GitHub highlights by the first
word and ignores the rest):

    runnable       run as written, in a fresh temporary working directory (default suite)
    slow           run after SUBSTITUTIONS (placeholders -> tiny fixtures), only with -m slow
    long           runs as written on a CPU but takes many minutes (syntax-checked only)
    gpu-only       needs GPUs (syntax-checked only)
    needs-data     needs real data, real weights or a trained SD run (syntax-checked only)
    needs-network  installs packages from the network (syntax-checked only)
    needs-slurm    submits to SLURM (syntax-checked only)

Every shell block passes ``bash -n`` and every python block compiles. A runnable or slow block
must exit 0 and write the files listed for it in PROMISES; where the doc quotes what a command
prints, the test compares (see the dry-run tests). A slow block may only use the placeholders of
SUBSTITUTIONS; add one there (with its fixture) before using a new placeholder in a slow block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "console", "shell"}
CLASSES = {"runnable", "slow", "long", "gpu-only", "needs-data", "needs-network", "needs-slurm"}

# Placeholder in a slow block -> what replaces it (built by `workspace` below; "{ws}" is the
# test's working directory). Runnable blocks get no substitution: they run exactly as written.
SUBSTITUTIONS = {
    "/tmp/tiny_sd": "{ws}/tiny_sd",  # written by the block itself
    "/data/photos": "{ws}/fixtures/photos",  # 12 small random JPEGs
    "/data/shards/canny": "{ws}/fixtures/canny_shards",  # from_images --condition canny of them
    "~/.cache/cn_lightning/circles_32px_val_64": "{ws}/fixtures/circles_val",  # 16 circles
    "<run dir>": "{ws}/fixtures/toy_run",  # 2 steps on the toy backbone (outline)
}
# Text that must not remain in a slow block after substitution (an unknown placeholder).
UNSUBSTITUTED = re.compile(r"/data/|/models/|<[a-z_ ]+>|~/|/tmp/")

# Files a block promises, as globs relative to the working directory (substitutions apply).
# Keyed by a piece of the block's text that identifies it.
PROMISES = {
    "+experiment=canny trainer=cpu": [
        "/tmp/tiny_sd/model_index.json",
        "outputs/canny/*/controlnet/config.json",
        "outputs/canny/*/checkpoints/last.ckpt",
    ],
    "cn_lightning.evaluate --val-shards ~/.cache": ["eval/quickstart/report.json"],
    "data_prep.from_images --src /data/photos": [
        "/data/shards/canny/manifest.json",
        "/data/shards/canny/data-000000.tar",
    ],
}
# Lines a block's output must contain (substitutions apply).
PRINTS = {
    "+experiment=canny trainer=cpu": [
        "global batch = 2 per device x 1 devices x 2 accumulation = 4"
    ],
}


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    cls: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse(path: Path) -> list[Block]:
    blocks, fence, start, body, indent = [], None, 0, [], 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if fence is None and line.startswith("```"):
            fence, start, body = line[3:].split(), n, []
            indent = len(raw) - len(raw.lstrip())  # a block inside a list item
        elif fence is not None and line == "```":
            lang = fence[0] if fence else ""
            cls = fence[1] if len(fence) > 1 else ""
            blocks.append(
                Block(str(path.relative_to(REPO)), start, lang, cls, "\n".join(body) + "\n")
            )
            fence = None
        elif fence is not None:
            body.append(raw[indent:] if raw[:indent].strip() == "" else raw)
    assert fence is None, f"{path}: unclosed fence at line {start}"
    return blocks


BLOCKS = [b for doc in DOCS for b in parse(doc) if b.lang in SHELL | {"python"}]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in SHELL]


def _ids(blocks):
    return [b.id for b in blocks]


def test_every_block_is_annotated():
    bad = [f"{b.id} ```{b.lang} {b.cls}".rstrip() for b in BLOCKS if b.cls not in CLASSES]
    assert not bad, f"blocks without a known class ({sorted(CLASSES)}): {bad}"
    assert any(b.cls == "runnable" for b in BLOCKS)


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_shell_block_parses(block):
    result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert result.returncode == 0, f"{block.id}: {result.stderr}"


@pytest.mark.parametrize(
    "block",
    [b for b in BLOCKS if b.lang == "python"],
    ids=_ids([b for b in BLOCKS if b.lang == "python"]),
)
def test_python_block_compiles(block):
    compile(block.text, block.id, "exec")


def test_slow_blocks_use_only_known_placeholders():
    for block in BLOCKS:
        if block.cls == "slow":
            text = block.text
            for key in SUBSTITUTIONS:
                text = text.replace(key, "X")
            left = UNSUBSTITUTED.findall(text)
            assert not left, f"{block.id}: placeholders {left} not in SUBSTITUTIONS"


def _env(ws: Path, **extra: str) -> dict[str, str]:
    """The user's environment, minus cluster/launcher variables, offline; venv python first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "WANDB_"))
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        CN_LIGHTNING_CACHE=str(ws / "cache"),
        HOME=str(ws / "home"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    env.update(extra)
    return env


def _run(
    block: Block, ws: Path, text: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    text = block.text if text is None else text
    if block.lang == "python":
        cmd = [sys.executable, "-c", text]
    else:
        # The docs' commands run from a checkout: repo-relative paths (slurm/..., the shipped
        # cn_lightning/assets/toy_sd) resolve through symlinks in the temp dir.
        for name in ("slurm", "cn_lightning"):
            if not (ws / name).exists():
                (ws / name).symlink_to(REPO / name)
        cmd = ["bash", "-e", "-o", "pipefail", "-c", text]
    result = subprocess.run(
        cmd, cwd=ws, env=_env(ws, **env), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (
        f"{block.id} failed ({result.returncode}):\n{text}\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def _check_promises(block: Block, ws: Path, result, subst) -> None:
    for key, globs in PROMISES.items():
        if key in block.text:
            for pattern in globs:
                pattern = subst(pattern)
                root = Path("/") if pattern.startswith("/") else ws
                assert list(root.glob(pattern.lstrip("/"))), f"{block.id}: {pattern} not written"
    for key, lines in PRINTS.items():
        if key in block.text:
            for line in lines:
                assert subst(line) in result.stdout + result.stderr, f"{block.id}: no {line!r}"


RUNNABLE = [b for b in BLOCKS if b.cls == "runnable"]


@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_runnable_block_runs_as_written(block, tmp_path):
    (tmp_path / "home").mkdir()
    result = _run(block, tmp_path)
    _check_promises(block, tmp_path, result, lambda s: s)


def _find(doc: str, piece: str) -> Block:
    (block,) = [b for b in BLOCKS if b.doc == doc and piece in b.text]
    return block


def test_prep_dry_run_prints_the_documented_command(tmp_path):
    block = _find("docs/scaling.md", "CN_DRY_RUN=1 SRC=")
    expected = [
        ln.strip()[2:] for ln in block.text.splitlines() if ln.strip().startswith("# srun ")
    ]
    assert expected
    (tmp_path / "home").mkdir()
    out = _run(block, tmp_path).stdout.splitlines()
    assert out == expected


def test_train_dry_run_inside_a_job_prints_the_documented_line(tmp_path):
    """scaling.md: 'Inside job 777 of /home/me it prints:' and the quoted line."""
    block = _find("docs/scaling.md", "CN_DRY_RUN=1 bash slurm/train_8xa100.sh")
    text = (REPO / "docs/scaling.md").read_text()
    quoted = text.split("Inside job 777 of\n`/home/me` it prints:", 1)[1].split("```")[1].strip()
    (tmp_path / "home").mkdir()
    out = _run(block, tmp_path, SLURM_JOB_ID="777", SLURM_SUBMIT_DIR=str(tmp_path)).stdout
    assert out.strip() == quoted.replace("/home/me", str(tmp_path))


# ---- slow: the expensive blocks, on tiny fixtures ---------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A working directory holding every fixture SUBSTITUTIONS points to."""
    import numpy as np
    from data_helpers import make_circle_shards
    from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
    from PIL import Image

    from cn_lightning.config import asset

    ws = tmp_path_factory.mktemp("docs_ws")
    (ws / "home").mkdir()
    fx = ws / "fixtures"
    (fx / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(
            fx / "photos" / f"{i}.jpg"
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.from_images",
            "--src",
            str(fx / "photos"),
            "--out",
            str(fx / "canny_shards"),
            "--condition",
            "canny",
        ],
        check=True,
        cwd=ws,
        env=_env(ws),
        capture_output=True,
    )
    make_circle_shards(fx / "circles_val", num_samples=16, size=32)
    make_circle_shards(fx / "circles_train", num_samples=16, size=32)
    run_train(
        tiny_run_overrides(asset("toy_sd"), str(fx / "circles_train"), fx / "toy_run", steps=2),
        subprocess_env(ws),
        cwd=ws,
    )
    assert (fx / "toy_run" / "controlnet" / "config.json").exists()
    return ws


SLOW = [b for b in BLOCKS if b.cls == "slow"]


@pytest.mark.slow
@pytest.mark.parametrize("block", SLOW, ids=_ids(SLOW))
def test_slow_block_runs_on_tiny_fixtures(block, workspace):
    def subst(s: str) -> str:
        for key, value in SUBSTITUTIONS.items():
            s = s.replace(key, value.format(ws=workspace))
        return s

    result = _run(block, workspace, subst(block.text))
    _check_promises(block, workspace, result, subst)
