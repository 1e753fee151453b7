"""Shared command-line plumbing: one clear error line (exit 2) instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cn_lightning.errors import CnLightningError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors read ``cn_lightning: error: ...`` like every other error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``cn_lightning: error: <first line of message>`` and exit with status 2."""
    text = str(message).strip()
    first = text.splitlines()[0] if text else "failed"
    print(f"cn_lightning: error: {first}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; user errors (bad paths, formats, names) become one line and exit 2."""
    try:
        return main(argv)
    except (CnLightningError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        fail(str(err))
