"""Errors that stop a recipe with one line instead of a traceback.

Every layer may raise them; :func:`rlhf_kit.training.run.one_line_errors` prints
``<program>: error: <message>`` for each and exits. They subclass the built-in type a caller would
otherwise catch (``ValueError``, ``OSError``, ``FloatingPointError``), so existing handlers keep working.
"""

from __future__ import annotations


class RunError(Exception):
    """A problem the user can fix (input, configuration, disk); the message says what and where."""


class ConfigError(RunError, ValueError):
    """Bad input: a configuration value, a data file line, a model directory, an output directory."""


class DataError(ConfigError):
    """A data file that cannot be read as given; the message names the file, 1-based line and field."""


class NonFiniteError(RunError, FloatingPointError):
    """Too many training steps produced NaN/inf (or a tensor about to be saved is not finite)."""


class DiskFullError(RunError, OSError):
    """A write failed because the disk is full; whatever was half-written has been removed."""
