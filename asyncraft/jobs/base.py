"""What a job gives the engine: tasks from its input, and what to do with each answer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from asyncraft.provider import Completion


@dataclass(slots=True)
class Task:
    id: str  # content hash of stage + request + generation parameters (records.content_id)
    stage: str
    body: dict[str, Any]  # the request body sent to the API
    meta: dict[str, Any] = field(default_factory=dict)  # small, copied into the record
    endpoint: str = "chat"  # "chat", "complete" (legacy /completions) or "embed"
    attempt: int = 0  # job-level attempts already paid for (answers that failed to parse)
    # The job's own, neither sent nor journaled: e.g. the chunk an answer's quotes are checked against
    # (the body holds it inside a prompt, and a record must not hold it once per question).
    private: Any = None


@dataclass(slots=True)
class InputProblem:
    key: str  # stable name of the bad item, e.g. "line:12" or "doc:a/b.pdf"
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Outcome:
    """A job's verdict on one answer: a result (and children), a paid retry, or a failure."""

    result: dict[str, Any] | None = None
    children: list[Task] = field(default_factory=list)
    retry: Task | None = None
    retry_reason: str = ""
    fail: str | None = None


class Job(Protocol):
    name: str

    def fingerprint(self) -> dict[str, Any]:
        """Parameters that change what is generated; stored in the state dir."""

    def roots(self) -> Iterator[Task | InputProblem]:
        """The input's tasks, lazily and in a stable order (runs on a worker thread)."""

    def wants(self, kind: str, stage: str) -> bool:
        """Whether recovery must hand this kind of record to ``replay``."""

    def replay(self, record: dict[str, Any]) -> None:
        """See a recovered record (e.g. to rebuild children of finished parents)."""

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        """Children of recovered results that still have to run."""

    def handle(self, task: Task, completion: Completion) -> Outcome:
        """Judge one answer."""
