"""The exception tree. Third-party errors are translated into these at the boundary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class AsyncraftError(Exception):
    """Root of every error asyncraft raises on purpose."""


class ConfigError(AsyncraftError):
    """A setting is missing or invalid; reported as one line, exit status 2."""


class InputError(AsyncraftError):
    """One input item (line, document) cannot be used; recorded and skipped."""


class ProviderError(AsyncraftError):
    """The API answered with an error or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
        rate_info: Any = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type
        self.retry_after = retry_after
        self.rate_info = rate_info  # provider.RateInfo of the answer's x-ratelimit-* headers, if it had any
        self.body = body  # the error response's body as the server sent it (JSON, or text), the key scrubbed out
        self.request_id = request_id  # the server's x-request-id


class RateLimited(ProviderError):
    """429 that will clear with time."""


class QuotaExhausted(ProviderError):
    """429 insufficient_quota: retrying only burns time; the run must stop."""


class AuthError(ProviderError):
    """401/403: the key or its permissions are wrong."""


class NotFound(ProviderError):
    """404: unknown model or wrong base URL."""


class BadRequest(ProviderError):
    """400/413/422: this request will never succeed as it is."""


class ServerError(ProviderError):
    """5xx."""


class ProviderTimeout(ProviderError):
    """The call took too long, or a streamed answer stopped arriving."""


class ConnectionFailed(ProviderError):
    """The connection was reset or closed before the answer was complete."""


class Unreachable(ConnectionFailed):
    """No connection could be made at all: nothing listening, unknown host, no route."""


class BadResponse(ProviderError):
    """The server answered 200 with a body that is not a chat completion."""


class JournalError(AsyncraftError):
    """The state directory cannot be written or read safely (exit status 1 unless a subclass says otherwise)."""


class StateInUse(JournalError):
    """Another process holds the state dir."""


class StateDamaged(JournalError):
    """The state dir holds damage (a record, a run, an index, a missing file, a gap); nothing was papered over."""

    def __init__(self, message: str, findings: Sequence[object] = ()) -> None:
        super().__init__(message)
        self.findings = list(findings)


class CorruptRecord(JournalError):
    """A record in the middle of the journal or a run fails its checksum."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class DiskFull(JournalError):
    """ENOSPC/EDQUOT while writing state; nothing was acknowledged past the last good commit (exit 75)."""


class StorageIOError(JournalError):
    """A write, rename or read of the state failed for another reason than a full disk (exit 74)."""


class FsyncFailed(StorageIOError):
    """fsync/fdatasync failed: the kernel may have dropped dirty pages; exit now (74)."""


class Incomplete(AsyncraftError):
    """The job is not finished (an export of a partial dataset was not asked for): exit 75."""


class StateMismatch(AsyncraftError):
    """The state dir belongs to a different job configuration."""
