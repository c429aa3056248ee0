"""Constrained (structured) output for the RAFT job: the JSON schemas of its two chat stages, the
request parameter that asks a server to enforce them, and RAFT's answer text assembled from the fields.

Servers enforce a schema in one of two dialects of ``response_format``:

- ``json_schema``: ``{"type": "json_schema", "json_schema": {"name", "strict": true, "schema"}}``, OpenAI's
  Structured Outputs, also taken by Azure OpenAI, vLLM (guided decoding), Ollama, llama.cpp's
  ``llama-server`` and LM Studio;
- ``json_object``: ``{"type": "json_object", "schema": {...}}``, the server of ``llama-cpp-python``, which
  refuses the first dialect (422) and turns the schema into a grammar.

The schemas use what OpenAI's strict mode accepts and the others enforce: every property required,
no other properties, ``minItems``/``maxItems``, ``pattern`` and ``enum`` (no string lengths: the
job bounds those with max_tokens).
"""

from __future__ import annotations

import json
import re
from typing import Any

from asyncraft.errors import BadRequest, ProviderError
from asyncraft.raft_prompts import is_placeholder

JSON_SCHEMA = "json_schema"
JSON_OBJECT = "json_object"
TAGGED = "tagged"  # the free-text prompts, parsed for question lines and the <ANSWER>: tag
FORMS = (JSON_SCHEMA, JSON_OBJECT)

# A question is one line ending with a question mark, without double quotes or backslashes: some
# servers apply the pattern to the JSON text of the string, where those would break the JSON.
QUESTION_PATTERN = r'^[^"\\\n?]+[?]$'
# Quotes are constrained to the context's own sentences (for llama.cpp's grammars) when the list
# is small enough to keep the grammar small.
MAX_ENUM_SENTENCES = 64
MAX_ENUM_CHARS = 8000


def questions_schema(n: int) -> dict[str, Any]:
    """``{"questions": [...]}``: 1 to ``n`` one-line questions."""
    item = {"type": "string", "pattern": QUESTION_PATTERN}
    return {"type": "object",
            "properties": {"questions": {"type": "array", "items": item, "minItems": 1, "maxItems": n}},
            "required": ["questions"], "additionalProperties": False}


def answer_schema(sentences: list[str]) -> dict[str, Any]:
    """``{"reasoning", "quotes", "answer"}``, with at least one quote; each quote one of the
    context's ``sentences`` when they are few enough (a constrained decoder then copies them
    exactly), any string otherwise (checked against the context afterwards)."""
    quote: dict[str, Any] = {"type": "string"}
    if 0 < len(sentences) <= MAX_ENUM_SENTENCES and sum(map(len, sentences)) <= MAX_ENUM_CHARS:
        quote["enum"] = sentences
    return {"type": "object",
            "properties": {"reasoning": {"type": "string"},
                           "quotes": {"type": "array", "items": quote, "minItems": 1},
                           "answer": {"type": "string"}},
            "required": ["reasoning", "quotes", "answer"], "additionalProperties": False}


BEGIN_QUOTE = "##begin_quote##"
END_QUOTE = "##end_quote##"


def response_format(form: str, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    if form == JSON_SCHEMA:
        return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}
    if form == JSON_OBJECT:
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"no response_format for form {form!r}")


_REFUSAL_WORDS = ("response_format", "json_schema", "json_object", "structured output", "guided")


def is_refusal(exc: ProviderError) -> bool:
    """Whether an error answer to a request that carried ``response_format`` refuses that parameter.

    Servers say so in their own words and statuses: "'response_format' of type 'json_schema' is not
    supported" (400), "Unrecognized request argument supplied: response_format" (400), a 422 that
    validates the request body, or llama-cpp-python's 500 that wraps that validation error. A
    bare 422 is a refusal too: it is what a server answers for a dialect it does not know."""
    if exc.status is None or exc.status == 429 or exc.status < 400:
        return False
    said = server_said(exc).lower()
    return (isinstance(exc, BadRequest) and exc.status == 422) or any(word in said for word in _REFUSAL_WORDS)


def server_said(exc: ProviderError) -> str:
    """The server's own message of an error answer ("HTTP 400 from URL [code]: message"), without
    the URL, whose host or path may hold any word."""
    return str(exc).partition(": ")[2]


def looks_like_json(content: str | None) -> bool:
    """Whether a reply is an attempt at a JSON object (valid or not), as opposed to free text: a
    server that ignores ``response_format`` answers free text."""
    text = (content or "").lstrip()
    return text.startswith(("{", "```"))


def load_object(content: str | None) -> dict[str, Any] | None:
    """The JSON object of a reply: the whole text, or what a model wrapped in a code fence or
    between words; None when there is none. Raw line breaks inside strings are forgiven: grammars
    that llama.cpp builds from a schema let them through."""
    text = (content or "").strip()
    if not text:
        return None
    candidates = [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end and (start, end) != (0, len(text) - 1):
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            obj = json.loads(candidate, strict=False)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def questions_from(content: str | None) -> list[str] | None:
    """The question strings of a ``{"questions": [...]}`` reply. A reply cut off by max_tokens
    keeps its complete strings (the grammar makes the output JSON, but it can still end half-way).
    None when the reply is no such object at all."""
    obj = load_object(content)
    if obj is not None:
        items = obj.get("questions")
        if not isinstance(items, list):
            return None
        return [q for q in items if isinstance(q, str)]
    text = content or ""
    m = re.search(r'"questions"\s*:\s*\[', text)
    if m is None:
        return None
    out: list[str] = []
    for s in _JSON_STRING.finditer(text, m.end()):
        try:
            out.append(json.loads(s.group(0), strict=False))
        except ValueError:
            break
    return out


# -- quotes ----------------------------------------------------------------------------------------

_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                       "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
                       "\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00a0": " "})
_EDGE = " \t\n\"'`.,;:!?()[]*\u2026-"


def _normalise(text: str) -> tuple[str, list[int]]:
    """``text`` lower-cased, typographic quotes and dashes folded, every run of whitespace one
    space; with the index in ``text`` of every character of the result."""
    out: list[str] = []
    where: list[int] = []
    space = True  # drops leading whitespace
    for i, ch in enumerate(text.translate(_FOLD).lower()):
        if ch.isspace():
            if not space:
                out.append(" ")
                where.append(i)
            space = True
            continue
        out.append(ch)
        where.append(i)
        space = False
    return "".join(out), where


def find_quote(quote: str, context: str) -> str | None:
    """The span of ``context`` that ``quote`` copies, or None when the context does not hold it.

    Models copy loosely: other quote marks, other spacing, other case, an ellipsis or stray
    punctuation at the ends. Those are forgiven; any other difference means the quote is not
    from the context."""
    hay, where = _normalise(context)
    trimmed = quote.strip().translate(_FOLD)
    for core in (trimmed.removesuffix("...").removesuffix("\u2026").strip(), trimmed.strip(_EDGE)):
        if len(core) < 3:
            continue
        needle, _ = _normalise(core)
        at = hay.find(needle)
        if at >= 0:
            return context[where[at]:where[at + len(needle) - 1] + 1]
    return None


def assemble_answer(obj: dict[str, Any], context: str) -> tuple[str | None, str]:
    """RAFT's chain-of-thought text from a ``{"reasoning", "quotes", "answer"}`` reply: the
    reasoning, each quote between ``##begin_quote##`` and ``##end_quote##`` as the context words it,
    and ``<ANSWER>: answer``. (None, why) when the reply has no final answer or no quote that
    occurs in the context; quotes the context does not hold are left out."""
    answer = obj.get("answer")
    reasoning = obj.get("reasoning")
    quotes = obj.get("quotes")
    if not isinstance(answer, str) or is_placeholder(_strip_tag(answer)):
        return None, "no final answer in the JSON reply"
    if not isinstance(reasoning, str):
        reasoning = ""
    found: list[str] = []
    for q in quotes if isinstance(quotes, list) else []:
        span = find_quote(q, context) if isinstance(q, str) else None
        if span is None or any(span in f for f in found):
            continue
        found = [f for f in found if f not in span]  # a longer copy of the same words replaces a shorter one
        found.append(span)
    if not found:
        return None, "no quote of the JSON reply occurs in the context"
    parts = [_clean_markers(reasoning)] if reasoning.strip() else []
    parts += [f"{BEGIN_QUOTE}{span}{END_QUOTE}" for span in found]
    parts.append(f"<ANSWER>: {_strip_tag(answer)}")
    return "\n".join(parts), ""


def _strip_tag(answer: str) -> str:
    # Tagged-prompt habits carried into a field: "<ANSWER>: Paris" is the answer "Paris".
    return re.sub(r"^\s*<\s*answer\s*>\s*:?", "", answer, flags=re.IGNORECASE).strip()


def _clean_markers(reasoning: str) -> str:
    # The assembled text must hold exactly the markers and the tag that the assembly writes.
    text = reasoning.replace(BEGIN_QUOTE, "").replace(END_QUOTE, "")
    return re.sub(r"<\s*answer\s*>\s*:?", "", text, flags=re.IGNORECASE).strip()
