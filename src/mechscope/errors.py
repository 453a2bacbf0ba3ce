"""Errors that name the problem and the fix.

Every error mechscope raises for bad input derives from :class:`MechscopeError`, so the command
line can print it as one line and exit non-zero without a traceback.
"""

from __future__ import annotations


class MechscopeError(Exception):
    """Base class: a user-facing error whose message says what went wrong and how to fix it."""


class SpecError(MechscopeError, ValueError):
    """A model spec mechscope does not know."""


class MissingPackageError(MechscopeError, ImportError):
    """An optional package is needed; the message holds the exact pip command."""

    def __init__(self, what: str, pip_command: str) -> None:
        super().__init__(f"{what} is not installed. Install it with:\n    {pip_command}")
        self.pip_command = pip_command


class WeightFileError(MechscopeError, OSError):
    """A weight file is missing, unreadable, corrupt, or does not match its config."""


class ArchitectureError(MechscopeError, ValueError):
    """TransformerLens cannot bridge this architecture."""


class OfflineError(MechscopeError, ConnectionError):
    """A hub model was named but the hub cannot be reached."""


class InputError(MechscopeError, ValueError):
    """Bad input: empty prompt, mismatched clean/corrupt lengths, sequence too long, NaN, ..."""


class HookNameError(InputError):
    """A hook, site, layer or head that the model (or a trace) does not have.

    An :class:`InputError` (and so a ``ValueError``), deliberately not a ``KeyError``: a bad
    layer or site is bad input, and callers catch it with ``except InputError``.
    """


class StoreError(MechscopeError, RuntimeError):
    """A store that cannot be opened or a run that does not exist."""
