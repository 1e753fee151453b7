"""Random weights, in each model-based extractor's real on-disk format, for tests and dry runs.

    python -m cn_lightning.conditions.random_weights --out /tmp/extractor_weights [hed depth ...]

writes one file or folder per extractor (all model-based ones by default) and prints the
``--weights`` to pass for each. The maps such weights make mean nothing; the point is to run
every loading, batching and shard-writing path offline, as the published weights would.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cn_lightning.conditions.base import model_extractors, needs_weights
from cn_lightning.conditions.registry import get_spec
from cn_lightning.errors import CnLightningError, fail


def write_random_weights(name: str, out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write random weights for extractor ``name`` under ``out_dir/name``; the weights path."""
    if not needs_weights(name):
        raise CnLightningError(f"condition extractor {name!r} has no model weights")
    target = os.path.join(os.fspath(out_dir), name)
    os.makedirs(target, exist_ok=True)
    return get_spec(name).factory.write_random_weights(target, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    import cn_lightning.conditions  # noqa: F401  (registers the built-ins)

    parser = argparse.ArgumentParser(
        prog="python -m cn_lightning.conditions.random_weights",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("names", nargs="*", help="extractors (default: every model-based one)")
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        for name in args.names or model_extractors():
            print(f"{name}: --weights {write_random_weights(name, args.out, args.seed)}")
    except CnLightningError as err:
        fail(err, parser.prog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
