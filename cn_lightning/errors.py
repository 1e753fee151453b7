"""User-facing error types.

Every error a user can fix (a wrong path, a file of the wrong kind, a bad config value) is raised as
a subclass of :class:`CnLightningError` with a one-line message that names the offending input and
what was expected, so the command line can print it without a traceback.
"""

from __future__ import annotations


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


class DataError(CnLightningError, ValueError):
    """Training or validation data is missing, unreadable or does not match the data settings
    (shard paths, condition key, cached latents, epoch length, shard count)."""


class NumericsError(CnLightningError, RuntimeError):
    """Training produced non-finite values (loss, gradients or weights) and cannot go on."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickled file references a type or function outside the allow-list of safe checkpoint
    contents: unpickling it could run code, so it is refused (see
    :func:`cn_lightning.utils.checkpoints.safe_torch_load`)."""
