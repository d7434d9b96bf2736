"""Errors that the entry point reports as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A config value (named in the message) is wrong or points at something missing."""


class DivergedError(RuntimeError):
    """Training produced non-finite weights or loss; the last good checkpoint was kept (named in the message)."""


class NonFiniteLossError(DivergedError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is kept untouched."""


class CorruptDataError(ValueError):
    """A data file or cached record is damaged (named in the message, with the fix); raised when skipping is off."""


def missing_file(path: str, key: str, what: str = "file") -> FileNotFoundError:
    """A FileNotFoundError that names the config key to set."""
    return FileNotFoundError(f"{what} not found: {path!r}. Set the config key `{key}` to an existing path.")
