"""What to do after a failed call: one place decides retryability and the delay."""

from __future__ import annotations

import enum
import random
import re

from asyncraft.errors import (
    AuthError,
    BadRequest,
    NotFound,
    ProviderError,
    QuotaExhausted,
)

# 2.0 ** 1024 overflows a float; every realistic cap is reached long before this exponent.
_MAX_EXPONENT = 60
_DIGITS = re.compile(r"\d+")


class Action(enum.Enum):
    RETRY = "retry"  # transient: try again after a delay; never recorded as a failure
    FAIL_TASK = "fail_task"  # this request will never work: record the task as failed, go on
    FATAL = "fatal"  # nothing will work (key, model, quota): stop the run cleanly, resumable


def classify(exc: ProviderError) -> Action:
    if isinstance(exc, (QuotaExhausted, AuthError, NotFound)):
        return Action.FATAL
    if isinstance(exc, BadRequest):
        return Action.FAIL_TASK
    # 429, 5xx, timeouts, refused or reset connections, malformed answers: time may fix them.
    return Action.RETRY


def failure_kind(exc: ProviderError) -> tuple[object, ...]:
    """What makes two refusals "the same error": status, code and the message with its numbers
    blanked (a context-length error names each request's own token count)."""
    return (exc.status, exc.code, _DIGITS.sub("#", str(exc)))


def backoff_cap(attempt: int, *, base: float, cap: float) -> float:
    """``base * 2 ** (attempt - 1)``, at most ``cap``, for any number of attempts (attempt counts from 1)."""
    return min(cap, base * 2.0 ** min(max(attempt - 1, 0), _MAX_EXPONENT))


def backoff(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
            rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter (attempt counts from 1); never less than Retry-After."""
    rand: float = (rng or random).random()
    delay = rand * backoff_cap(attempt, base=base, cap=cap)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
