"""The generic job: a JSONL file of chat requests in, one completion per input line out.

Input lines are either OpenAI Batch API lines (``custom_id``, ``method``, ``url``, ``body``) or
bare chat bodies (``messages`` plus parameters, optional ``custom_id``). A task's id is the hash
of the exact request body, so identical requests are made once, and editing other lines of the
file costs nothing on the next run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from asyncraft.jobs.base import InputProblem, Outcome, Task
from asyncraft.provider import Completion
from asyncraft.records import content_id

log = logging.getLogger("asyncraft")

STAGE = "prompts"
_DROP = ("stream", "stream_options")  # the engine reads whole responses
MAX_LINE_EXCERPT = 200


class PromptsJob:
    name = "prompts"

    def __init__(self, input_path: str | Path, *, model: str | None, extra_body: dict[str, Any]) -> None:
        self.input_path = Path(input_path)
        self.model = model
        self.extra_body = dict(extra_body)
        self._unbounded_warned = False

    def fingerprint(self) -> dict[str, Any]:
        return {"job": self.name, "model": self.model, "extra_body": self.extra_body}

    def roots(self) -> Iterator[Task | InputProblem]:
        with open(self.input_path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                yield self.parse_line(lineno, raw)

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

    def wants(self, kind: str, stage: str) -> bool:
        return False

    def replay(self, record: dict[str, Any]) -> None:
        return None

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        return ()

    def handle(self, task: Task, completion: Completion) -> Outcome:
        return Outcome(result={"message": completion.message, "finish_reason": completion.finish_reason,
                               "model": completion.model})


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
