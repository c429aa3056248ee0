"""Journal record encoding: one JSON object per line, checksummed, readable by ``jq``.

A line is ``{...,"c":"xxxxxxxx"}\\n`` where ``c`` is the CRC-32 of the same object serialised
without ``c`` (that is, the line with its last 16 bytes replaced by ``}``). The fixed-width tail
lets the reader verify a line without re-serialising it.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from typing import Any

import orjson


class Kind(enum.IntEnum):
    """What a journal record says about its task (the ``k`` field names it in the journal)."""

    META = 0  # everything else: input progress, seals, notes, lost placeholders
    DONE = 1
    FAIL = 2
    ATTEMPT = 3  # a paid answer the job rejected and asked again
    IERR = 4  # an input problem
    RESOLVED = 5  # an input problem whose item was read again and handled (a half-written line, completed)


KIND_OF = {"done": Kind.DONE, "fail": Kind.FAIL, "attempt": Kind.ATTEMPT, "ierr": Kind.IERR,
           "resolved": Kind.RESOLVED}
NAME_OF = {v: k for k, v in KIND_OF.items()}


def kind_of(record: dict[str, Any]) -> Kind:
    return KIND_OF.get(record.get("k", ""), Kind.META)


_TAIL = b',"c":"'
TAIL_LEN = 16  # len(b',"c":"xxxxxxxx"}')


def encode(record: dict[str, Any]) -> bytes:
    body = orjson.dumps(record)
    return b"%s,\"c\":\"%08x\"}\n" % (body[:-1], zlib.crc32(body))


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one line (with or without its newline), or None if torn or damaged."""
    if line.endswith(b"\n"):
        line = line[:-1]
    if len(line) < TAIL_LEN + 2 or line[-TAIL_LEN:-10] != _TAIL or line[-2:] != b'"}':
        return None
    body = line[:-TAIL_LEN] + b"}"
    # Compare the text, not the parsed number: "2B08ec40" must not pass for "2b08ec40".
    if line[-10:-2] != b"%08x" % zlib.crc32(body):
        return None
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def content_id(*parts: Any) -> str:
    """128-bit content hash (hex) of JSON-serialisable parts; key order does not matter."""
    data = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def id_key(task_id: str) -> int:
    """The in-memory form of a task id: an int costs less than the 32-character string."""
    return int(task_id, 16)


def scrub(text: str, secret: str | None) -> str:
    """Remove a secret from text that may have echoed it (server error messages)."""
    if secret and len(secret) >= 4 and secret in text:
        return text.replace(secret, "***")
    return text
