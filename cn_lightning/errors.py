"""User-facing error types.

Every error a user can fix (a wrong path, a file of the wrong kind, a bad config value) is raised as
a subclass of :class:`CnLightningError` with a one-line message that names the offending input and
what was expected, so the command line can print it without a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class CnLightningError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class BackboneLoadError(CnLightningError, ValueError):
    """A Stable Diffusion backbone (folder or single file) could not be loaded.

    Also a :class:`ValueError`, so callers that catch ``ValueError`` keep working.
    """


class CheckpointFormatError(CnLightningError, ValueError):
    """A ControlNet state dict is not in the layout a converter expects."""


class ConfigError(CnLightningError, ValueError):
    """A configuration value is missing or invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A name (condition extractor, preset, ...) that is not registered.

    Also a :class:`KeyError`, so lookups that catch ``KeyError`` keep working; its message reads
    as plain text (not the quoted ``repr`` a ``KeyError`` shows).
    """

    __str__ = Exception.__str__


class DataError(CnLightningError, ValueError):
    """Training or validation data is missing, unreadable or does not match the data settings
    (shard paths, condition key, cached latents, epoch length, shard count)."""


class NumericsError(CnLightningError, RuntimeError):
    """Training produced non-finite values (loss, gradients or weights) and cannot go on."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickled file references a type or function outside the allow-list of safe checkpoint
    contents: unpickling it could run code, so it is refused (see
    :func:`cn_lightning.safe_load.safe_torch_load`)."""


EXIT_USAGE = 2


def first_line(err: BaseException | str) -> str:
    """The first non-empty line of an error (or message); the exception's type name if it is empty.

    Library errors often continue over many lines (a ``load_state_dict`` report, a traceback
    text); the user sees the first one.
    """
    text = str(err).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(err).__name__ if isinstance(err, BaseException) else "failed"


def user_message(err: BaseException) -> str:
    """One line for the user: the innermost cn_lightning error if a framework (Hydra, Lightning)
    wrapped one, else the wrapper's first line followed by the innermost cause's."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, CnLightningError):
        cause = cause.__cause__
    if isinstance(cause, CnLightningError) or cause is err:
        return first_line(cause)
    return f"{first_line(err).rstrip(':')}: {type(cause).__name__}: {first_line(cause)}"


def error_line(message: BaseException | str, prog: str = "cn_lightning") -> str:
    """``<prog>: error: <first line>``: how every command of the project reports a user error."""
    text = user_message(message) if isinstance(message, BaseException) else first_line(message)
    return f"{prog}: error: {text}"


def fail(
    message: BaseException | str, prog: str = "cn_lightning", code: int = EXIT_USAGE
) -> NoReturn:
    """Print :func:`error_line` to stderr and exit with ``code`` (2: a usage or input error)."""
    print(error_line(message, prog), file=sys.stderr)
    raise SystemExit(code)
