"""What the simulator says: deterministic text that depends only on the request.

Plain requests get a short canned answer. Requests that look like the RAFT prompts get answers
of the right shape, so the RAFT job can be run end to end without a model: a question-generation
prompt ("generate N ... questions") gets N numbered questions drawn from the chunk, and an answer
prompt (one that mentions ``##begin_quote##``) gets reasoning that quotes the best-matching
sentence of the context and ends with ``<ANSWER>: ...``. A request with a ``response_format`` schema
(either dialect) gets a JSON object of that schema, as a server that enforces it would answer: the
RAFT job's ``{"questions"}`` and ``{"reasoning", "quotes", "answer"}`` with the same content, any
other schema with placeholder values.

Markers in a prompt let tests ask for misbehaviour: ``[[sim:bad-request]]`` is refused with 400
(``[[sim:bad-request:REASON]]`` names its own reason, so that refusals differ), ``[[sim:no-answer-tag]]``
makes an answer without ``<ANSWER>:`` (an empty ``answer`` field in JSON).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import orjson

BAD_REQUEST_MARKER = "[[sim:bad-request]]"
BAD_REQUEST = re.compile(r"\[\[sim:bad-request(?::([^\]]*))?\]\]")
NO_ANSWER_TAG_MARKER = "[[sim:no-answer-tag]]"

_WORDS = ("asynchronous", "journal", "snapshot", "latency", "gradient", "context", "retrieval", "oracle",
          "distractor", "throughput", "checksum", "replica", "quota", "token", "chunk", "dataset")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_QUESTIONS = re.compile(r"generate\s+(\d+)\s+(?:\w+\s+){0,3}questions", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).digest()


def message_text(msg: Any) -> str:
    if not isinstance(msg, dict):
        return ""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_text(body: dict[str, Any]) -> str:
    return "\n".join(message_text(m) for m in body.get("messages") or ())


def requested_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request asks the server to enforce, in either dialect of ``response_format``."""
    rf = body.get("response_format")
    if not isinstance(rf, dict):
        return None
    schema = rf.get("json_schema", {}).get("schema") if rf.get("type") == "json_schema" else rf.get("schema")
    return schema if isinstance(schema, dict) else None


def chat_reply(body: dict[str, Any]) -> str:
    messages = body.get("messages") or []
    text = prompt_text(body)
    last_user = next((message_text(m) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                     text)
    schema = requested_schema(body)
    props = schema.get("properties") if schema is not None else None
    if isinstance(props, dict):
        if "##begin_quote##" in text and {"quotes", "answer"} <= props.keys():
            return orjson.dumps(_raft_answer_fields(text, last_user)).decode()
        m = _QUESTIONS.search(text)
        if m and "questions" in props:
            return orjson.dumps({"questions": _raft_question_list(int(m.group(1)), last_user)}).decode()
        return orjson.dumps({k: [] if v.get("type") == "array" else "simulated" for k, v in props.items()
                             if isinstance(v, dict)}).decode()
    if "##begin_quote##" in text:
        return _raft_answer(text, last_user)
    m = _QUESTIONS.search(text)
    if m:
        return _raft_questions(int(m.group(1)), last_user)
    h = _digest(text)
    words = " ".join(_WORDS[b % len(_WORDS)] for b in h[:6])
    topic = " ".join(last_user.split()[:12])
    return f"Simulated answer about \"{topic}\": {words}."


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if len(s.split()) >= 4]


def _raft_question_list(n: int, chunk: str) -> list[str]:
    sents = _sentences(chunk) or [chunk.strip() or "this text"]
    out = []
    for i in range(max(1, n)):
        s = sents[i % len(sents)]
        phrase = " ".join(s.rstrip(".!?").split()[:8])
        lead = ("What does the text say about", "According to the passage, what is meant by",
                "Why does the document mention", "How is the following described:")[i % 4]
        out.append(f"{lead} \"{phrase}\"?")
    return out


def _raft_questions(n: int, chunk: str) -> str:
    return "\n".join(f"{i + 1}. {q}" for i, q in enumerate(_raft_question_list(n, chunk)))


def _field(text: str, name: str, stop: str | None) -> str:
    start = text.find(name)
    if start < 0:
        return ""
    start += len(name)
    end = text.find(stop, start) if stop else -1
    return text[start:end if end >= 0 else len(text)].strip()


def _best_sentence(text: str, last_user: str) -> tuple[str, str, str]:
    """(question, the context sentence sharing most words with it, a short answer from it)."""
    question = _field(last_user, "Question:", "\n") or _field(text, "Question:", "\n")
    context = _field(last_user, "Context:", "Answer this question") or last_user
    sents = _sentences(context) or [context.strip()]
    qwords = set(_WORD.findall(question.lower()))
    best = max(sents, key=lambda s: (len(qwords & set(_WORD.findall(s.lower()))), -sents.index(s)))
    return question, best, " ".join(best.rstrip(".!?").split()[:12])


def _raft_answer(text: str, last_user: str) -> str:
    question, best, answer = _best_sentence(text, last_user)
    reason = (f"##Reason: The question asks {question!r}. The context states ##begin_quote## {best} "
              "##end_quote##, which answers it directly.")
    if NO_ANSWER_TAG_MARKER in text:
        return reason + f" So the answer is {answer}."
    return f"{reason}\n<ANSWER>: {answer}"


def _raft_answer_fields(text: str, last_user: str) -> dict[str, Any]:
    question, best, answer = _best_sentence(text, last_user)
    return {"reasoning": f"The question asks {question!r}, and one sentence of the context answers it directly.",
            "quotes": [best], "answer": "" if NO_ANSWER_TAG_MARKER in text else answer}


def embed(text: str, dim: int) -> list[float]:
    """A bag-of-words vector (feature hashing): texts sharing words point the same way."""
    vec = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        h = _digest(word)
        idx = int.from_bytes(h[:4], "little") % dim
        vec[idx] += 1.0 if h[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def choice_reply(body: dict[str, Any], index: int) -> str:
    """The content of choice ``index`` of a request with ``n`` > 1: the first is ``chat_reply``; the others
    differ from it (as samples of a real model would), except where a schema fixes the shape."""
    reply = chat_reply(body)
    if index == 0 or requested_schema(body) is not None:
        return reply
    return f"{reply} (choice {index + 1})"


def completion_reply(prompt: str) -> str:
    """The text a legacy ``/v1/completions`` request gets: a continuation of the prompt."""
    h = _digest(prompt)
    return " " + " ".join(_WORDS[b % len(_WORDS)] for b in h[:8]) + "."


def _logprob(token: str, rank: int) -> float:
    return -round((_digest(token)[0] / 255.0) * 0.5 + rank * 1.25, 4)


def token_logprobs(piece: str, top: int) -> dict[str, Any]:
    """A logprobs entry of one token, in OpenAI's chat shape (with ``top`` alternatives)."""
    alternatives = [piece] + [f"{piece.strip()}{'_' * i}" for i in range(1, top)]
    return {"token": piece, "logprob": _logprob(piece, 0), "bytes": list(piece.encode()),
            "top_logprobs": [{"token": t, "logprob": _logprob(t, i), "bytes": list(t.encode())}
                             for i, t in enumerate(alternatives[:top])]}
