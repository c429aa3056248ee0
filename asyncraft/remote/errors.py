"""Errors of the object-store layer, each under the asyncraft category that decides its exit status.

``RemoteConfigError`` (exit 2): the URL, bucket or credentials cannot work. ``LeaseHeld``, ``LeaseLost`` and
``RemoteStateError`` (exit 1): the state is in use by another owner, or the bucket's contents are damaged.
``RemoteUnavailable`` is transient: the replicator retries it and only callers that cannot wait see it.
"""

from __future__ import annotations

from asyncraft.errors import AsyncraftError, ConfigError, JournalError


class RemoteError(AsyncraftError):
    """Root of the object-store errors; messages never hold credentials."""


class RemoteConfigError(RemoteError, ConfigError):
    """Bad state URL, missing bucket, refused credentials: retrying will not help."""


class RemoteUnavailable(RemoteError):
    """The store could not be reached or answered 5xx/429/timeout: retry later."""


class RemoteStateError(RemoteError, JournalError):
    """The bucket's objects contradict each other (a chunk missing inside the adopted history, bad JSON)."""


class ObjectMissing(RemoteStateError):
    """An object the head or the chain names is not there (deleted by a newer head, or damage)."""


class LeaseHeld(RemoteError, JournalError):
    """Another process owns the state URL and its lease has not expired."""


class LeaseLost(RemoteError, JournalError):
    """Another process took the lease over: this one must stop writing at once."""


class AlreadyExists(RemoteError):
    """A create-only write found the object there (internal: callers decide what that means)."""


class PreconditionFailed(RemoteError):
    """A conditional update found another version (internal)."""
