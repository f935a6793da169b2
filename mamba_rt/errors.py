"""Exception types.

User errors (bad input: a malformed checkpoint, a wrong shape, a token id out of range) raise
:class:`MambaRTError` or one of its subclasses, with a message that names what was received and what
was expected. Internal bugs raise :class:`InternalError`. The CLI prints a ``MambaRTError`` as one
line; anything else is a bug and gets a traceback.
"""


class MambaRTError(Exception):
    """A user-facing error: the input was wrong, and the message says how."""


class ConfigError(MambaRTError):
    """config.json is missing, malformed, or describes a model mamba-rt does not support."""


class CheckpointError(MambaRTError):
    """Weights are missing, truncated, of the wrong shape, or unsafe to load."""


class UnsupportedError(MambaRTError):
    """A valid request mamba-rt does not implement (yet): Mamba-2, an unsupported dtype, ..."""


class InputError(MambaRTError):
    """A runtime input (token ids, batch, lengths, tensors) does not match what was expected."""


class MissingDependencyError(MambaRTError, ImportError):
    """An optional library is not installed; the message names the extra that brings it."""


class InternalError(RuntimeError):
    """A bug in mamba-rt: an invariant that should always hold did not."""
