"""Exceptions with messages meant for users: each says what was wrong and what to do."""


class SeamError(Exception):
    """Base class of every error seamlm raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(SeamError):
    """A config file, option or value is invalid."""


class DataError(SeamError):
    """A data file is missing, empty, malformed or lacks a column."""


class ModelLoadError(SeamError):
    """A model could not be located or loaded."""


class NonFiniteLossError(SeamError):
    """Training produced NaN/inf; the last good checkpoint is kept."""


class CheckpointError(SeamError):
    """A checkpoint could not be written or does not match the run being resumed."""
