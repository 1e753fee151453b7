"""Command-line plumbing shared by the CLIs: ``argparse`` whose errors are one line, and a
runner that turns user errors into that line (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cn_lightning.errors import CnLightningError, fail


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors read ``cn_lightning: error: ...`` like every other error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; user errors (bad paths, formats, names) become one line and exit 2."""
    try:
        return main(argv)
    except (CnLightningError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        fail(str(err))
