"""What a prompts job's records hold, read back: the response body, its answer text, OpenAI Batch output lines.

A done record keeps the whole response body as the server returned it (``raw``) and the ``request_id``;
records written before that kept the first choice's ``message``, ``finish_reason`` and ``model`` only, and are
read back as the body they were cut from.
"""

from __future__ import annotations

import base64
from array import array
from typing import Any

from asyncraft.records import content_id


def response_body(rec: dict[str, Any]) -> dict[str, Any]:
    """The response body of a done record."""
    raw = rec.get("raw")
    if isinstance(raw, dict):
        return raw
    message = rec.get("message")
    if not isinstance(message, dict):
        message = {}
    body: dict[str, Any] = {"object": "chat.completion", "model": rec.get("model"),
                            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                                         "finish_reason": rec.get("finish_reason")}]}
    if rec.get("usage") is not None:
        body["usage"] = rec["usage"]
    return body


def _choices(body: dict[str, Any]) -> list[dict[str, Any]]:
    choices = body.get("choices")
    return [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []


def choice_text(choice: dict[str, Any]) -> Any:
    """A chat choice's message content, or a legacy completion choice's text."""
    message = choice.get("message")
    return message.get("content") if isinstance(message, dict) else choice.get("text")


def answer_text(rec: dict[str, Any]) -> str:
    """The first answer's text of any done record (a raft job's too), for one-line views."""
    if "raw" not in rec:
        message = rec.get("message")
        return str(message.get("content") or "") if isinstance(message, dict) else ""
    body = response_body(rec)
    if body.get("object") == "list":
        return f"[{len(body.get('data') or [])} embedding(s)]"
    choices = _choices(body)
    return str(choice_text(choices[0]) or "") if choices else ""


def _vector(value: Any) -> Any:
    """An embedding as floats: OpenAI's base64 form (``encoding_format: base64``) is little-endian float32."""
    if isinstance(value, str):
        floats = array("f")
        floats.frombytes(base64.b64decode(value))
        return floats.tolist()
    return value


def result_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """The fields of a done line in ``--format prompts``: the first choice's content, finish reason and tool
    calls (all choices under ``choices`` when there are several), or the vectors of an embeddings request."""
    body = response_body(rec)
    out: dict[str, Any] = {}
    if body.get("object") == "list":
        data = sorted((d for d in body.get("data") or () if isinstance(d, dict)),
                      key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
        out["embeddings"] = [_vector(d.get("embedding")) for d in data]
    else:
        choices = _choices(body)
        first = choices[0] if choices else {}
        out.update(content=choice_text(first), finish_reason=first.get("finish_reason"))
        message = first.get("message")
        if isinstance(message, dict) and message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        if len(choices) > 1:
            out["choices"] = [_choice_fields(c) for c in choices]
    out.update(usage=rec.get("usage"), model=body.get("model"))
    return out


def _choice_fields(choice: dict[str, Any]) -> dict[str, Any]:
    out = {"index": choice.get("index"), "content": choice_text(choice), "finish_reason": choice.get("finish_reason")}
    message = choice.get("message")
    if isinstance(message, dict) and message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


# -- OpenAI Batch API output lines ---------------------------------------------------------------------


def batch_id(line: int, sample: int | None, task_id: str | None) -> str:
    """The ``id`` of an output line: stable across exports, different for every line (and sample)."""
    return "batch_req_" + content_id(line, sample, task_id)[:24]


def batch_line(custom_id: str | None, bid: str, *, response: dict[str, Any] | None = None,
               error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": bid, "custom_id": custom_id, "response": response, "error": error}


def batch_done(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``response`` of a done record: the body as the server returned it."""
    return {"status_code": 200, "request_id": rec.get("request_id"), "body": response_body(rec)}


def batch_failed(rec: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(response, error) of a failed record: the server's answer where it gave one (a 400 and its error body, as
    OpenAI's Batch API reports a request the model refused), otherwise an error object."""
    response = rec.get("response")
    if isinstance(response, dict):
        return response, None
    err = rec.get("error")
    if not isinstance(err, dict):
        err = {}
    return None, {"code": err.get("code") or err.get("type") or "failed", "message": err.get("message")}


def batch_status(row: dict[str, Any]) -> str:
    """A Batch output line's status, for the export's summary."""
    response = row.get("response")
    if isinstance(response, dict):
        return "ok" if response.get("status_code") == 200 else "failed"
    code = str((row.get("error") or {}).get("code"))
    return {"invalid_request": "invalid", "blank_line": "blank", "pending": "pending"}.get(code, "failed")
