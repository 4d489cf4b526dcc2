"""Leaf utilities: errors, paths, logging, timing. Imports nothing from leanfm."""

from leanfm.utils.errors import CheckpointError, ContextLengthError, LeanfmError

__all__ = ["CheckpointError", "ContextLengthError", "LeanfmError"]
