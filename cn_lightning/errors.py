"""User-facing errors: raised for bad input, printed as one line by the command-line tools."""


class CnLightningError(Exception):
    """Base class of errors that mean "the input is wrong", not "the code is broken"."""


class BackboneLoadError(CnLightningError, ValueError):
    """A model path is missing or does not hold what was expected."""


class ConfigError(CnLightningError, ValueError):
    """A configuration value is missing or invalid."""
