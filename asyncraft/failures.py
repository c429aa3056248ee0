"""The end-of-run account of failed tasks: how many failed for each reason, with one example each; and of the
input problems, how many of each kind.

A count alone ("13 failed") sends people to the journal; the reason and what the server or the
model returned usually tell them what to change.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

EXAMPLE_CHARS = 160
_NUMBER = re.compile(r"\d+")
# "line 12: not valid JSON (unexpected character: line 1 column 2)" is of the kind "not valid JSON".
_WHERE = re.compile(r"^(line \d+|[^:]+\.\w+(#\d+)?): ")
_DETAIL = re.compile(r" \(.*\)$")


def problem_kind(message: str) -> str:
    """An input problem's message without where it is and its details."""
    return _DETAIL.sub("", _WHERE.sub("", message, count=1)) or message


class FailureTally:
    """Failure records (``{"k": "fail", ...}``) of one run, grouped by stage and reason."""

    __slots__ = ("_counts", "_first", "_problems")

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._first: dict[tuple[str, str], tuple[str, str | None]] = {}  # its first message, and reply if any
        self._problems: Counter[str] = Counter()  # input problems recorded in this run, by kind

    def add(self, rec: dict[str, Any]) -> None:
        if rec.get("k") == "ierr":
            self._problems[problem_kind(str(rec.get("msg") or ""))] += 1
            return
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
        """One line per reason, the most frequent first; then one per kind of input problem."""
        out = self._failure_lines(limit)
        problems = self._problems.total()
        if problems:
            out.append(f"{problems} input problem(s) recorded in this run, by kind (each one is in errors.jsonl and "
                       "`asyncraft tail --errors`):")
            out += [f"  {n} x {kind}" for kind, n in self._problems.most_common(limit)]
            if len(self._problems) > limit:
                out.append(f"  ... and {len(self._problems) - limit} other kind(s)")
        return out

    def _failure_lines(self, limit: int) -> list[str]:
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
