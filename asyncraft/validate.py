"""Checking a 200 response against the shape its stage needs, before anything is journaled as done.

A server can answer 200 with something the stage cannot use: a chat reply without text, or
embeddings that are not one vector per input. llama.cpp's server in embedding mode answers with one
vector per *token* of each input (``"embedding": [[...], [...]]``) when the model has no pooling;
those are mean-pooled here into one vector per input, which is what a pooled model would return.
Anything else is ``Malformed``: the job asks again a bounded number of times, then records the task
as failed with a description of what came back.
"""

from __future__ import annotations

import math
from typing import Any


class Malformed(ValueError):
    """A 200 response without the shape its stage needs."""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _vector(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_number(x) for x in v)


def mean_pool(tokens: list[list[float]]) -> list[float]:
    """The mean of per-token vectors of one length."""
    dim = len(tokens[0])
    return [math.fsum(t[i] for t in tokens) / len(tokens) for i in range(dim)]


def embedding_vectors(vectors: Any, inputs: int) -> tuple[list[list[float]], int]:
    """One vector per input, all of one length (per-token vectors mean-pooled), and how many
    inputs were pooled. Raises ``Malformed`` with what came back instead."""
    if not isinstance(vectors, list):
        raise Malformed(f"the embeddings response holds no list of vectors (got {type(vectors).__name__})")
    if len(vectors) != inputs:
        raise Malformed(f"the embeddings response has {len(vectors)} vector(s) for {inputs} input(s)")
    out: list[list[float]] = []
    pooled = 0
    for i, v in enumerate(vectors):
        if isinstance(v, list) and v and all(isinstance(t, list) for t in v):
            if not all(_vector(t) for t in v) or len({len(t) for t in v}) != 1:
                raise Malformed(f"input {i}: per-token vectors that are not all numbers of one length")
            v = mean_pool(v)
            pooled += 1
        elif not _vector(v):
            raise Malformed(f"input {i}: the embedding is not a list of numbers ({describe(v)})")
        out.append(v)
    dims = sorted({len(v) for v in out})
    if len(dims) > 1:
        raise Malformed(f"the embeddings have different lengths ({', '.join(map(str, dims))})")
    return out, pooled


def describe(value: Any, depth: int = 0) -> str:
    """A short description of a JSON value's shape, for messages: "list[3] of list[768] of float"."""
    if isinstance(value, list):
        inner = f" of {describe(value[0], depth + 1)}" if value and depth < 3 else ""
        return f"list[{len(value)}]{inner}"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def chat_text(message: dict[str, Any]) -> str | None:
    """The reply's text, or None when it has none (missing, empty, or not a string)."""
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    return content
