"""The generic job: a JSONL file of chat requests in, one completion per input line out.

Input lines are either OpenAI Batch API lines (``custom_id``, ``method``, ``url``, ``body``) or
bare chat bodies (``messages`` plus parameters, optional ``custom_id``). A task's id is the hash
of the exact request body, so identical requests are made once, and editing other lines of the
file costs nothing on the next run.

A resume does not read the part of the input that is fully handled again: the run records how far every line
has its outcome on disk (an ``inpos`` journal record: byte offset, line number, CRC-32 of the bytes before the
offset, and the file's identity), and the next run starts reading there. If the file changed (it grew, or was
edited), the CRC of that prefix is checked first; an edited prefix is read again from the start.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncraft.errors import ConfigError
from asyncraft.jobs.base import InputProblem, Outcome, Task
from asyncraft.provider import Completion
from asyncraft.records import content_id, id_key

log = logging.getLogger("asyncraft")

STAGE = "prompts"
UTF8_BOM = b"\xef\xbb\xbf"
_DROP = ("stream", "stream_options")  # the engine reads whole responses
MAX_LINE_EXCERPT = 200
COUNT_BLOCK = 8 << 20  # bytes per read when counting lines: large blocks keep the count at memory speed


def count_lines(path: Path, stop: threading.Event | None = None) -> int | None:
    """The lines of a file (a last line without a newline counts), counted in big binary blocks; None when
    ``stop`` was set before the end."""
    lines = 0
    last = b"\n"
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(COUNT_BLOCK):
            if stop is not None and stop.is_set():
                return None
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


@dataclass(frozen=True, slots=True)
class InputPosition:
    """The start of the input's unhandled part: a line boundary, the lines before it, the CRC of the bytes."""

    offset: int
    line: int
    crc: int


class InputTracker:
    """Follows how far the input is fully handled: every line before ``position`` has its outcome on disk.

    The reader adds each line it reads (on the feeder's thread); ``advance`` (on the event loop) moves past
    the lines whose task is settled in the state dir. A line whose task is not settled (still running, given
    up for this run, or not started before a stop) holds the position back. At most ``cap`` lines are
    followed ahead of it: past that the position cannot move anyway until the oldest line settles."""

    def __init__(self, start: InputPosition, settled: Callable[[int | None, bool], bool], cap: int = 200_000) -> None:
        self.position = start
        self._settled = settled
        self._lines: deque[tuple[int, int, int, int | None, bool]] = deque()  # line, end, crc, key, is problem
        self._cap = cap
        self.feeding = True

    def add(self, line: int, end: int, crc: int, key: int | None, problem: bool) -> None:
        if self.feeding and len(self._lines) < self._cap:
            self._lines.append((line, end, crc, key, problem))
        else:
            self.feeding = False  # the position stops where the followed lines end

    def advance(self) -> InputPosition:
        lines = self._lines
        while lines:
            line, end, crc, key, problem = lines[0]
            if not self._settled(key, problem):
                break
            lines.popleft()
            self.position = InputPosition(end, line, crc)
        return self.position


class PromptsJob:
    name = "prompts"

    def __init__(self, input_path: str | Path, *, model: str | None, extra_body: dict[str, Any]) -> None:
        self.input_path = Path(input_path)
        check_encoding(self.input_path)
        self.model = model
        self.extra_body = dict(extra_body)
        self._start: InputPosition | None = None
        self.tracker: InputTracker | None = None
        self._unbounded_warned = False
        self.lines: int | None = None  # counted at start (count_input), for the total before the input is read
        self.not_tasks = 0  # blank and invalid lines read so far: lines that are no task

    def count_input(self, stop: threading.Event) -> None:
        """Count the input's lines (the scheduler runs this on a thread at start, and sets ``stop`` when the run
        ends first)."""
        self.lines = count_lines(self.input_path, stop)

    def totals(self, read: int | None) -> dict[str, dict[str, int]] | None:
        """Tasks in all: exact once the scheduler has read the input (``read``), before that the counted lines
        less those read that hold no task (repeated lines still count: they are found out only as they are read)."""
        if read is not None:
            return {STAGE: {"total": read}}
        if self.lines is None:
            return None
        return {STAGE: {"total": max(self.lines - self.not_tasks, 0)}}

    def fingerprint(self) -> dict[str, Any]:
        return {"job": self.name, "model": self.model, "extra_body": self.extra_body}

    def roots(self) -> Iterator[Task | InputProblem]:
        """Every line in order, from where the last run left off on the first call (see ``resume_from``)."""
        start, self._start = self._start, None
        offset, lineno, crc = (start.offset, start.line, start.crc) if start else (0, 0, 0)
        tracker = self.tracker
        self.not_tasks = 0
        with open(self.input_path, "rb") as fh:
            if offset:
                fh.seek(offset)
            for raw in fh:
                lineno += 1
                offset += len(raw)
                if tracker is not None and not raw.endswith(b"\n"):
                    # A last line without its newline may be half-written: the next run reads it again, whole.
                    tracker.feeding = False
                if tracker is not None and tracker.feeding:
                    crc = zlib.crc32(raw, crc)
                if lineno == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]  # written by some editors and Windows tools; not part of the JSON
                if not raw.strip():
                    self.not_tasks += 1
                    if tracker is not None:
                        tracker.add(lineno, offset, crc, None, False)
                    continue
                item = self.parse_line(lineno, raw)
                if isinstance(item, InputProblem):
                    self.not_tasks += 1
                if tracker is not None:
                    if isinstance(item, InputProblem):
                        tracker.add(lineno, offset, crc, id_key(problem_id(item.key)), True)
                    else:
                        tracker.add(lineno, offset, crc, id_key(item.id), False)
                yield item
        if tracker is not None:
            tracker.feeding = False  # later passes (--watch) read from the start; the position stays put

    # -- resuming past the handled part of the input ---------------------------------------------------

    def position_record(self, pos: InputPosition) -> dict[str, Any]:
        """The journal record of an input position, with what identifies the file and the configuration."""
        st = self.input_path.stat()
        return {"k": "inpos", "offset": pos.offset, "line": pos.line, "crc": pos.crc, "fp": self._fp(),
                "ino": st.st_ino, "dev": st.st_dev, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def resume_from(self, rec: dict[str, Any] | None, settled: Callable[[int | None, bool], bool], *,
                    trust_position: bool = True) -> None:
        """Start the first pass at the recorded position if it still describes this input, and follow progress."""
        start = InputPosition(0, 0, 0)
        why = self._check_position(rec) if rec and trust_position else None
        if rec and trust_position and why is None:
            start = InputPosition(int(rec["offset"]), int(rec["line"]), int(rec["crc"]))
            self._start = start
            log.info("input: lines 1..%d are handled; reading from line %d (byte %d)", start.line, start.line + 1,
                     start.offset)
        elif why:
            log.info("input: reading from the start (%s)", why)
        self.tracker = InputTracker(start, settled)

    def _fp(self) -> str:
        return content_id(self.fingerprint())[:16]

    def _check_position(self, rec: dict[str, Any]) -> str | None:
        """Why the recorded position cannot be used (None when it can)."""
        offset = int(rec.get("offset") or 0)
        if offset <= 0:
            return None if rec.get("reset") is None else f"reset by {rec['reset']}"
        if rec.get("fp") != self._fp():
            return "the configuration changed"
        try:
            st = self.input_path.stat()
        except OSError as exc:
            return str(exc)
        if st.st_size < offset:
            return "the input is shorter than the part already handled"
        if (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (rec.get("ino"), rec.get("dev"), rec.get("size"),
                                                                   rec.get("mtime_ns")):
            return None  # the very file the position was taken on
        crc = 0
        left = offset
        with open(self.input_path, "rb") as fh:
            while left:
                chunk = fh.read(min(left, 8 << 20))
                if not chunk:
                    break
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
        if left or crc != rec.get("crc"):
            return f"the part already handled (lines 1..{int(rec.get('line') or 0)}) changed"
        return None

    def parse_line(self, lineno: int, raw: bytes) -> Task | InputProblem:
        key = f"line:{lineno}"
        excerpt = raw[:MAX_LINE_EXCERPT].decode("utf-8", "replace").rstrip("\n")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return InputProblem(key, f"line {lineno}: not valid JSON ({exc})", {"line": lineno, "text": excerpt})
        problem = _check(obj)
        if problem:
            return InputProblem(key, f"line {lineno}: {problem}", {"line": lineno, "text": excerpt})
        custom_id = obj.get("custom_id")
        body = dict(obj["body"] if "body" in obj else {k: v for k, v in obj.items() if k != "custom_id"})
        for k in _DROP:
            body.pop(k, None)
        body.update(self.extra_body)
        if self.model:
            body["model"] = self.model
        elif not isinstance(body.get("model"), str) or not body["model"]:
            return InputProblem(key, f"line {lineno}: no model: set ASYNCRAFT_MODEL or give \"model\" in the line",
                                {"line": lineno, "text": excerpt})
        if not self._unbounded_warned and "max_tokens" not in body and "max_completion_tokens" not in body:
            # Said once: a model that does not stop generates up to its context limit on every such line.
            self._unbounded_warned = True
            log.warning("line %d (and maybe others) sets no max_tokens: a model that does not stop runs to its "
                        "context limit on such a line; set max_tokens in the lines or with --extra-body "
                        "'{\"max_tokens\": 1024}'", lineno)
        meta: dict[str, Any] = {"line": lineno}
        if custom_id is not None:
            meta["custom_id"] = str(custom_id)
        return Task(content_id(STAGE, body), STAGE, body, meta)

    def problem_key(self, task: Task) -> str | None:
        """The key its line's problem had, if it had one (``InputProblem.key``)."""
        return f"line:{task.meta['line']}"

    def wants(self, kind: str, stage: str) -> bool:
        return False

    def replay(self, record: dict[str, Any]) -> None:
        return None

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        return ()

    def handle(self, task: Task, completion: Completion) -> Outcome:
        return Outcome(result={"message": completion.message, "finish_reason": completion.finish_reason,
                               "model": completion.model})


def check_encoding(path: Path) -> None:
    """JSONL is UTF-8 (a UTF-8 byte-order mark is skipped); UTF-16 is named as such, not misread line by line."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ConfigError(f"--input {path}: cannot read it: {exc.strerror}") from None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 2 and (head[0] == 0) != (head[1] == 0)):
        raise ConfigError(f"--input {path} is UTF-16 text; asyncraft reads UTF-8 JSONL. Convert it, e.g. "
                          f"`iconv -f UTF-16 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`")


def problem_id(key: str) -> str:
    """The id of an input problem's record (the scheduler journals it under this id)."""
    return content_id("ierr", key)


def _check(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if "body" in obj:
        url = obj.get("url", "/v1/chat/completions")
        if not isinstance(url, str) or not url.rstrip("/").endswith("/chat/completions"):
            return f"url {url!r} is not supported (only /v1/chat/completions)"
        method = obj.get("method", "POST")
        if str(method).upper() != "POST":
            return f"method {method!r} is not supported (only POST)"
        body = obj["body"]
        if not isinstance(body, dict):
            return "\"body\" must be a JSON object"
    else:
        body = obj
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "\"messages\" must be a non-empty list"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            return f"messages[{i}] must be an object with a \"role\""
        if "content" not in msg and "tool_calls" not in msg:
            return f"messages[{i}] has no \"content\""
    return None
