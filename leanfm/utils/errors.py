"""User-facing errors: the CLI prints `error: <message>` on one line and exits non-zero, no traceback.

Raise `LeanfmError` (or a subclass) for anything the user can fix: a missing file, a corrupt
checkpoint, an unsupported architecture, a prompt longer than the context. The message names the
problem and how to fix it.
"""

from __future__ import annotations


class LeanfmError(Exception):
    """An error caused by input the user controls, with a message that says how to fix it."""


class CheckpointError(LeanfmError):
    """A model file or directory that cannot be read: missing, truncated, corrupt or unsupported."""


class ContextLengthError(LeanfmError):
    """A prompt (plus requested tokens) that does not fit the model's context."""
