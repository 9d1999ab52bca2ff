"""Typed errors for adapterhub.

The library raises these and never prints or exits; the CLI maps each type to one
`error:` line and an exit code (see `adapterhub.cli.errors`). Every error carries the
context a user needs (an object id, a path, a ref name) in its message.
"""

from __future__ import annotations


class AhError(Exception):
    """Base class: an operation failed (exit code 1)."""

    exit_code = 1


class UsageError(AhError):
    """The user asked for something malformed or nonexistent (exit code 2)."""

    exit_code = 2


# --- registry -------------------------------------------------------------------------


class NotARegistry(UsageError):
    """No `.ah/` folder where one was expected."""


class RegistryExists(UsageError):
    """`init` on a folder that already holds a registry."""


class UnsupportedFormat(AhError):
    """The registry or an object uses a format version this build does not know."""


# --- revisions and refs ---------------------------------------------------------------


class UnknownRevision(UsageError):
    """A revision expression names nothing."""


class AmbiguousRevision(UsageError):
    """An abbreviated id matches more than one object."""


class BadRefName(UsageError):
    """A branch or tag name breaks the ref-name rules."""


class RefExists(UsageError):
    """Creating a branch or tag that already exists."""


class RefConflict(AhError):
    """A compare-and-swap ref update lost a race: the ref moved under us."""


class RefLocked(AhError):
    """Another process holds the ref's lock file."""


# --- objects --------------------------------------------------------------------------


class ObjectNotFound(AhError):
    """An object id that should be in the store is not."""

    def __init__(self, oid: str, message: str | None = None):
        super().__init__(message or f"object {oid} not found in the store")
        self.oid = oid


class CorruptObject(AhError):
    """A stored object fails its hash or its structural check."""

    def __init__(self, oid: str, reason: str):
        super().__init__(f"corrupt object {oid}: {reason}")
        self.oid = oid
        self.reason = reason


# --- adapter input --------------------------------------------------------------------


class BadAdapter(UsageError):
    """An adapter folder cannot be committed as it is."""


class PickleRefused(BadAdapter):
    """Pickle-based weights: refused, never unpickled."""


class MalformedSafetensors(BadAdapter):
    """A `.safetensors` file that breaks the format."""


class UnsafePath(BadAdapter):
    """A file name that could escape or corrupt the target folder."""


class CheckoutError(AhError):
    """Checkout refused to write (target not empty, symlink in the way)."""
