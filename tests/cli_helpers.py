"""Helpers for testing the command-line tools' error reporting."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cn_lightning.cli import run_cli


def cli_error(capsys, main: Callable, argv: list[str]) -> str:
    """Run ``main`` through ``run_cli``; assert exit 2 with exactly one error line; return it."""
    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cn_lightning: error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]
