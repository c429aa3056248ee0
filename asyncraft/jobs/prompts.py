"""The generic job: a JSONL file of API requests in, one result per input line out.

Input lines are either OpenAI Batch API lines (``custom_id``, ``method``, ``url``, ``body``; the url picks
chat completions, legacy completions or embeddings) or bare chat bodies (``messages`` plus parameters,
optional ``custom_id``). Top-level fields that are not part of the request (other than the Batch API's four,
or, in a bare body, other than the chat-completions parameters in ``CHAT_PARAMETERS``) are not sent: they are
the line's metadata, which export carries. A task's id is the hash of the exact request body (and of the
sample index past the first, with ``--samples``), so identical requests are made once, and editing other
lines of the file costs nothing on the next run. Each done record keeps the whole response body as the
server returned it.

A resume does not read the part of the input that is fully handled again: the run records how far every line
has its outcome on disk (an ``inpos`` journal record: byte offset, line number, CRC-32 of the bytes before the
offset, and the file's identity), and the next run starts reading there. If the file changed (it grew, or was
edited), the CRC of that prefix is checked first; an edited prefix is read again from the start.
"""

from __future__ import annotations

import logging
import threading
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import compress, islice
from operator import eq
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
SHOWN_DUPLICATES = 5  # repeated custom_ids logged one by one; the rest are counted
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

# The endpoints of OpenAI's Batch API, by the end of a line's url, and the engine's name for each.
ENDPOINTS = (("/chat/completions", "chat"), ("/completions", "complete"), ("/embeddings", "embed"))
URL_OF = {"chat": "/v1/chat/completions", "complete": "/v1/completions", "embed": "/v1/embeddings"}
REQUEST_FORM = frozenset({"custom_id", "method", "url", "body"})
# What a bare line may send: OpenAI's chat-completions parameters and the sampling parameters that vLLM,
# SGLang and llama.cpp servers take as well. Any other top-level field of a bare line is metadata; a
# parameter not listed here can be sent in the Batch form's "body", which is sent as it is.
CHAT_PARAMETERS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
    "chat_template_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
    "stop_token_ids", "include_stop_str_in_output",
})


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

    def __init__(self, start: InputPosition, settled: Callable[[int, bool], bool], cap: int = 200_000) -> None:
        self.position = start
        self._settled = settled
        # line, end, crc, the keys of its tasks (one per sample; none for a blank line), is problem
        self._lines: deque[tuple[int, int, int, tuple[int, ...], bool]] = deque()
        self._cap = cap
        self.feeding = True

    def add(self, line: int, end: int, crc: int, keys: tuple[int, ...], problem: bool) -> None:
        if self.feeding and len(self._lines) < self._cap:
            self._lines.append((line, end, crc, keys, problem))
        else:
            self.feeding = False  # the position stops where the followed lines end

    def advance(self) -> InputPosition:
        lines = self._lines
        while lines:
            line, end, crc, keys, problem = lines[0]
            if not all(self._settled(key, problem) for key in keys):
                break
            lines.popleft()
            self.position = InputPosition(end, line, crc)
        return self.position


class Repeats:
    """Repeated request bodies and custom_ids in one pass over the input, in 24 bytes a line: 64-bit hashes in
    arrays, sorted once at the end of the pass (sets of a million ids and strings would take some 180 MB for the
    whole run; the sort takes about 45 MB a million lines, for a moment)."""

    def __init__(self) -> None:
        self._bodies = array("Q")
        self._ids = array("q")
        self._id_lines = array("Q")

    def add(self, line: int, task: Task) -> None:
        self._bodies.append(int(task.id[:16], 16))
        custom_id = task.meta.get("custom_id")
        if custom_id is not None:
            # Python's own string hash: 64 bits, and only compared within this process.
            self._ids.append(hash(custom_id))
            self._id_lines.append(line)

    def shared(self) -> int:
        """Lines whose request body an earlier line has."""
        return len(_repeats(self._bodies))

    def repeated_ids(self) -> list[tuple[int, int]]:
        """(line, the first line with its custom_id) of every line whose custom_id an earlier line has."""
        repeated = set(_repeats(self._ids))
        if not repeated:
            return []
        first: dict[int, int] = {}
        out = []
        for h, line in zip(self._ids, self._id_lines, strict=True):
            if h in repeated:
                if h in first:
                    out.append((line, first[h]))
                else:
                    first[h] = line
        return out


def _repeats(values: array[int]) -> list[int]:
    """Each value once for every time it occurs after its first (sorted, compared with the next: all in C)."""
    ordered = sorted(values)
    return list(compress(ordered, map(eq, ordered, islice(ordered, 1, None))))


@dataclass(slots=True)
class InputLine:
    """One line of the input as export sees it: its tasks (one per sample), or why it has none."""

    line: int
    tasks: list[Task]
    problem: InputProblem | None = None  # None and no tasks: a blank line


class PromptsJob:
    name = "prompts"

    def __init__(self, input_path: str | Path, *, model: str | None, extra_body: dict[str, Any],
                 samples: int = 1) -> None:
        self.input_path = Path(input_path)
        check_encoding(self.input_path)
        self.model = model
        self.extra_body = dict(extra_body)
        self.samples = samples
        self._start: InputPosition | None = None
        self.tracker: InputTracker | None = None
        self._unbounded_warned = False
        self.shared_lines = 0  # lines of the last pass whose request repeats an earlier line's (one answer for both)
        self.repeated_ids = 0  # lines of the last pass whose custom_id an earlier line has
        self.lines_counted: int | None = None  # counted at start (count_input), for the total before the input is read
        self.not_tasks = 0  # blank and invalid lines read so far in this pass: lines that make no task

    def count_input(self, stop: threading.Event) -> None:
        """Count the input's lines (the scheduler runs this on a thread at start, and sets ``stop`` when the run
        ends first)."""
        self.lines_counted = count_lines(self.input_path, stop)

    def totals(self, read: int | None) -> dict[str, dict[str, int]] | None:
        """Tasks in all: exact once the scheduler has read the input (``read``), before that the counted lines
        less those read that make no task, times the samples (repeated lines still count: they are found out
        only as they are read)."""
        if read is not None:
            return {STAGE: {"total": read}}
        if self.lines_counted is None:
            return None
        return {STAGE: {"total": max(self.lines_counted - self.not_tasks, 0) * self.samples}}

    def problem_key(self, task: Task) -> str | None:
        """The key its line's problem had, if it had one (``InputProblem.key``)."""
        return f"line:{task.meta['line']}"

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"job": self.name, "model": self.model, "extra_body": self.extra_body}
        if self.samples != 1:  # absent at 1, so that state dirs made before --samples existed still match
            fp["samples"] = self.samples
        return fp

    def input_summary(self) -> dict[str, int]:
        """What the last pass over the input found about repeated lines (for the status)."""
        return {"shared_lines": self.shared_lines, "repeated_custom_ids": self.repeated_ids}

    def roots(self) -> Iterator[Task | InputProblem]:
        """Every line's tasks in order, from where the last run left off on the first call (see ``resume_from``)."""
        start, self._start = self._start, None
        tracker = self.tracker
        repeats = Repeats()
        self.not_tasks = 0
        for lineno, end, crc, whole, item in self._read(start, tracker is not None and tracker.feeding):
            if tracker is not None and not whole:
                # A last line without its newline may be half-written: the next run reads it again, whole.
                tracker.feeding = False
            if not item or isinstance(item, InputProblem):
                self.not_tasks += 1
            if isinstance(item, InputProblem):
                if tracker is not None:
                    tracker.add(lineno, end, crc, (id_key(problem_id(item.key)),), True)
                yield item
                continue
            if tracker is not None:
                tracker.add(lineno, end, crc, tuple(id_key(t.id) for t in item), False)
            if item:
                repeats.add(lineno, item[0])
                yield from item
        if tracker is not None:
            tracker.feeding = False  # later passes (--watch) read from the start; the position stays put
        self.shared_lines = repeats.shared()
        pairs = repeats.repeated_ids()
        self.repeated_ids = len(pairs)
        for line, first in pairs[:SHOWN_DUPLICATES]:
            log.warning("line %d has the custom_id of line %d (OpenAI's Batch API refuses such a file; asyncraft "
                        "answers both lines and exports each with its line number)", line, first)
        if len(pairs) > SHOWN_DUPLICATES:
            shown = ", ".join(str(line) for line, _ in pairs[:50])
            log.warning("%d lines in all repeat an earlier line's custom_id (lines %s%s)", len(pairs), shown,
                        ", ..." if len(pairs) > 50 else "")
        if self.shared_lines:
            log.warning("%d line(s) repeat the request body of an earlier line and share its answer (one call for "
                        "all of them); --samples K draws K independent answers per line", self.shared_lines)

    def lines(self) -> Iterator[InputLine]:
        """Every line from the start, blank ones included (for export)."""
        for lineno, _end, _crc, _whole, item in self._read(None, False):
            if isinstance(item, InputProblem):
                yield InputLine(lineno, [], item)
            else:
                yield InputLine(lineno, item)

    def _read(self, start: InputPosition | None,
              follow: bool) -> Iterator[tuple[int, int, int, bool, list[Task] | InputProblem]]:
        """(line number, end offset, CRC of the bytes up to the end (when ``follow``), whether the line ends with
        its newline, the line's tasks or its problem) of every line from ``start``; a blank line has no tasks."""
        offset, lineno, crc = (start.offset, start.line, start.crc) if start else (0, 0, 0)
        with open(self.input_path, "rb") as fh:
            if offset:
                fh.seek(offset)
            for raw in fh:
                lineno += 1
                offset += len(raw)
                if follow:
                    crc = zlib.crc32(raw, crc)
                if lineno == 1 and raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM) :]  # written by some editors and Windows tools; not part of the JSON
                whole = raw.endswith(b"\n")
                if not raw.strip():
                    yield lineno, offset, crc, whole, []
                    continue
                item = self.parse_line(lineno, raw)
                yield lineno, offset, crc, whole, item if isinstance(item, InputProblem) else self._sampled(item)

    def _sampled(self, task: Task) -> list[Task]:
        """The line's task once per sample. Sample 0 keeps the id of the request alone, so that raising
        --samples keeps the answers already paid for."""
        if self.samples == 1:
            return [task]
        tasks = [Task(task.id, task.stage, task.body, {**task.meta, "sample": 0}, task.endpoint, private=task.private)]
        for i in range(1, self.samples):
            tasks.append(Task(content_id(task.id, {"sample": i}), task.stage, task.body, {**task.meta, "sample": i},
                              task.endpoint, private=task.private))
        return tasks

    # -- resuming past the handled part of the input ---------------------------------------------------

    def position_record(self, pos: InputPosition) -> dict[str, Any]:
        """The journal record of an input position, with what identifies the file and the configuration."""
        st = self.input_path.stat()
        return {"k": "inpos", "offset": pos.offset, "line": pos.line, "crc": pos.crc, "fp": self._fp(),
                "ino": st.st_ino, "dev": st.st_dev, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def resume_from(self, rec: dict[str, Any] | None, settled: Callable[[int, bool], bool], *,
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
        detail: dict[str, Any] = {"line": lineno, "text": excerpt}
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return InputProblem(key, f"line {lineno}: not valid JSON ({exc})", detail)
        if isinstance(obj, dict) and obj.get("custom_id") is not None:
            detail["custom_id"] = str(obj["custom_id"])  # an invalid line's row in the export still names it
        endpoint, problem = _check(obj)
        if problem:
            return InputProblem(key, f"line {lineno}: {problem}", detail)
        if "body" in obj:
            source, metadata = obj["body"], {k: v for k, v in obj.items() if k not in REQUEST_FORM}
        else:
            source = {k: v for k, v in obj.items() if k in CHAT_PARAMETERS}
            metadata = {k: v for k, v in obj.items() if k not in CHAT_PARAMETERS and k != "custom_id"}
        body = dict(source)
        for k in _DROP:
            body.pop(k, None)
        body.update(self.extra_body)
        if self.model:
            body["model"] = self.model
        elif not isinstance(body.get("model"), str) or not body["model"]:
            return InputProblem(key, f"line {lineno}: no model: set ASYNCRAFT_MODEL or give \"model\" in the line",
                                detail)
        if (endpoint != "embed" and not self._unbounded_warned and "max_tokens" not in body
                and "max_completion_tokens" not in body):
            # Said once: a model that does not stop generates up to its context limit on every such line.
            self._unbounded_warned = True
            log.warning("line %d (and maybe others) sets no max_tokens: a model that does not stop runs to its "
                        "context limit on such a line; set max_tokens in the lines or with --extra-body "
                        "'{\"max_tokens\": 1024}'", lineno)
        meta: dict[str, Any] = {"line": lineno}
        if "custom_id" in detail:
            meta["custom_id"] = detail["custom_id"]
        # Chat ids are as they always were; the other endpoints' bodies are told apart by the endpoint as well.
        tid = content_id(STAGE, body) if endpoint == "chat" else content_id(STAGE, endpoint, body)
        return Task(tid, STAGE, body, meta, endpoint, private=metadata or None)

    def wants(self, kind: str, stage: str) -> bool:
        return False

    def replay(self, record: dict[str, Any]) -> None:
        return None

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        return ()

    def handle(self, task: Task, completion: Completion) -> Outcome:
        # The whole body, as the server returned it (a streamed answer as the non-streamed body); export
        # derives the content, finish reason and model from it, so nothing is stored twice.
        result: dict[str, Any] = {"raw": completion.raw}
        if completion.request_id is not None:
            result["request_id"] = completion.request_id
        return Outcome(result=result)


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


def endpoint_of(url: Any) -> str | None:
    """The engine's endpoint for a Batch API line's url, or None if it is not one asyncraft serves."""
    if not isinstance(url, str):
        return None
    path = url.split("?", 1)[0].rstrip("/")
    return next((name for end, name in ENDPOINTS if path.endswith(end)), None)


def _check(obj: Any) -> tuple[str, str | None]:
    """(endpoint, what is wrong with the line or None)."""
    if not isinstance(obj, dict):
        return "chat", "expected a JSON object"
    endpoint = "chat"
    if "body" in obj:
        url = obj.get("url", URL_OF["chat"])
        found = endpoint_of(url)
        if found is None:
            return endpoint, (f"url {url!r} is not supported (only {', '.join(URL_OF.values())})")
        endpoint = found
        method = obj.get("method", "POST")
        if str(method).upper() != "POST":
            return endpoint, f"method {method!r} is not supported (only POST)"
        body = obj["body"]
        if not isinstance(body, dict):
            return endpoint, "\"body\" must be a JSON object"
    else:
        body = obj
    if endpoint == "embed":
        return endpoint, _nonempty(body, "input")
    if endpoint == "complete":
        return endpoint, _nonempty(body, "prompt")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return endpoint, "\"messages\" must be a non-empty list"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            return endpoint, f"messages[{i}] must be an object with a \"role\""
        if "content" not in msg and "tool_calls" not in msg:
            return endpoint, f"messages[{i}] has no \"content\""
    return endpoint, None


def _nonempty(body: dict[str, Any], field: str) -> str | None:
    """An embeddings ``input`` or a completions ``prompt``: text or tokens, or a list of them; not empty."""
    value = body.get(field)
    if isinstance(value, str) and value or isinstance(value, list) and value:
        return None
    return f"\"{field}\" must be a non-empty string or list"
