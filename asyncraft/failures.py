"""The end-of-run account of failed tasks: how many failed for each reason, with one example each.

A count alone ("13 failed") sends people to the journal; the reason and what the server or the
model returned usually tell them what to change.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

EXAMPLE_CHARS = 160
_NUMBER = re.compile(r"\d+")


class FailureTally:
    """Failure records (``{"k": "fail", ...}``) of one run, grouped by stage and reason."""

    __slots__ = ("_counts", "_first")

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._first: dict[tuple[str, str], tuple[str, str | None]] = {}  # its first message, and reply if any

    def add(self, rec: dict[str, Any]) -> None:
        if rec.get("k") != "fail":
            return
        error = rec.get("error")
        if not isinstance(error, dict):
            error = {}
        message = str(error.get("message") or error.get("type") or "unknown")
        # Messages that differ only in numbers (attempts, token counts) are one reason.
        key = (str(rec.get("stage") or ""), _NUMBER.sub("N", message))
        self._counts[key] += 1
        if key not in self._first:
            reply = rec.get("message")
            text = reply.get("content") if isinstance(reply, dict) else None
            self._first[key] = (message, _excerpt(text) if isinstance(text, str) and text.strip() else None)

    def lines(self, limit: int = 10) -> list[str]:
        """One line per reason, the most frequent first."""
        total = self._counts.total()
        if not total:
            return []
        out = [f"{total} task(s) failed in this run, by reason (the raw replies are in errors.jsonl and "
               "`asyncraft tail --errors`):"]
        for key, n in self._counts.most_common(limit):
            message, reply = self._first[key]
            example = f" - the reply was e.g. {reply!r}" if reply is not None else ""
            out.append(f"  {n} x {key[0] or 'task'}: {message}{example}")
        rest = len(self._counts) - limit
        if rest > 0:
            out.append(f"  ... and {rest} other reason(s)")
        return out


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= EXAMPLE_CHARS else flat[:EXAMPLE_CHARS] + "..."
