"""The errors minir1 raises for bad input, each naming the file, field or flag at fault.

They derive from ValueError / RuntimeError, so a caller that catches those keeps working; the CLI turns
them into one line on stderr and exit status 1.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the field (and the file, if any)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match its config; the message names it."""


class TrainingError(RuntimeError):
    """A run cannot start or continue (non-finite loss, mismatched resume, bad stage settings)."""
