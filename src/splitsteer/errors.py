"""Errors raised to users. Each carries a one-line message; the CLI maps them to exit codes."""

from __future__ import annotations


class SplitsteerError(Exception):
    """Base class. ``exit_code`` is 2 for usage/input errors and 1 for runtime failures."""

    exit_code = 2


class InputError(SplitsteerError):
    """Bad input: a file, a field, a line, an option. Exit code 2."""


class ArtifactError(InputError):
    """A steering artifact that is missing, corrupt or does not fit the model."""


class ModelError(InputError):
    """A model that cannot be found, loaded or whose sites cannot be located."""


class RuntimeFailure(SplitsteerError):
    """A failure while running (NaN loss, judge endpoint down, ...). Exit code 1."""

    exit_code = 1
