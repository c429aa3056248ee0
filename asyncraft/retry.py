"""What to do after a failed call: one place decides retryability and the delay."""

from __future__ import annotations

import enum
import random

from asyncraft.errors import (
    AuthError,
    BadRequest,
    BadResponse,
    ConnectionFailed,
    NotFound,
    ProviderError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    ServerError,
)


class Action(enum.Enum):
    RETRY = "retry"  # transient: try again after a delay; never recorded as a failure
    FAIL_TASK = "fail_task"  # this request will never work: record the task as failed, go on
    FATAL = "fatal"  # nothing will work (key, model, quota): stop the run cleanly, resumable


def classify(exc: ProviderError) -> Action:
    if isinstance(exc, (QuotaExhausted, AuthError, NotFound)):
        return Action.FATAL
    if isinstance(exc, BadRequest):
        return Action.FAIL_TASK
    if isinstance(exc, (RateLimited, ServerError, ProviderTimeout, ConnectionFailed, BadResponse)):
        return Action.RETRY
    return Action.RETRY


def backoff(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
            rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (attempt counts from 1); never less than Retry-After."""
    rand: float = (rng or random).random()
    delay = rand * min(cap, base * 2.0 ** (attempt - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
