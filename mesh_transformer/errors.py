"""Errors shared across the package, in a module that imports nothing of it.

``ConfigError`` lives here rather than in ``config`` so that the architecture modules, which
``config`` imports, can raise it without an import cycle. ``config`` re-exports it.
"""


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


class ConversionError(ValueError):
    """Tensors or files that do not match what the config says; the message names both."""


class DataError(ValueError):
    """Training or validation data that cannot be read as the config asks; the message names the file,
    the byte offset where there is one, and what was expected."""
