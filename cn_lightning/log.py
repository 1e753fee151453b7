"""The one home of cn_lightning's ``[cn_lightning] ...`` lines: console and ``train.log`` alike.

Every such line goes through the ``cn_lightning`` logger, by :func:`info` and :func:`warning`
(no module keeps its own logger, prints, or calls Lightning's ``rank_zero_info``):

- On the console, :class:`ConsoleHandler` writes the message as it is (no timestamp), INFO to
  stdout and WARNING and above to stderr, to the *current* ``sys.stdout``/``sys.stderr``, so the
  lines land above a live progress bar and in pytest's capture.
- The records propagate to the root logger as usual. Under ``python -m cn_lightning.train``,
  Hydra's job logging (``conf/hydra/default.yaml``) writes them to ``<run dir>/train.log`` with a
  timestamp, and keeps them (:class:`ExcludeFilter`) off its own console handler, which would
  repeat them: each line once on the console, once in ``train.log``.
- Without Hydra (the Python API, tests) they reach the console through :class:`ConsoleHandler`,
  and whatever handlers the root logger has (pytest's ``caplog``, say).

:func:`info` and :func:`warning` speak on global rank 0 only, so a multi-GPU run says each line
once; ``all_ranks=True`` is for what each rank must say for itself (its share of the data).
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "cn_lightning"
PREFIX = "[cn_lightning] "


class ConsoleHandler(logging.Handler):
    """INFO and below to the current ``sys.stdout``, WARNING and above to ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class ExcludeFilter(logging.Filter):
    """Drops the records of logger ``name`` and its children (the opposite of
    ``logging.Filter``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not super().filter(record)


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``cn_lightning`` logger, or its child ``cn_lightning.<name>``."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def is_global_zero() -> bool:
    """True on global rank 0 (as Lightning knows it: its strategy, or the launcher's env vars)."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def info(message: str, all_ranks: bool = False) -> None:
    """Say ``[cn_lightning] message`` once (rank 0; every rank with ``all_ranks``, for what
    differs between ranks): console stdout and ``train.log``."""
    if all_ranks or is_global_zero():
        get_logger().info(_prefixed(message))


def warning(message: str, all_ranks: bool = False) -> None:
    """Say ``[cn_lightning] message`` once (rank 0; every rank with ``all_ranks``): console
    stderr and ``train.log``."""
    if all_ranks or is_global_zero():
        get_logger().warning(_prefixed(message))


def _prefixed(message: str) -> str:
    return message if message.startswith(PREFIX) else PREFIX + message


def _install_default() -> None:
    """Console output when nothing configured the logger (Hydra's job logging replaces it)."""
    logger = get_logger()
    if logger.handlers:
        return
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


_install_default()

__all__ = [
    "ConsoleHandler",
    "ExcludeFilter",
    "LOGGER_NAME",
    "get_logger",
    "info",
    "is_global_zero",
    "warning",
]
