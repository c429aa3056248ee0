"""Splitting documents into chunks: a fast offline sentence-aware chunker, and a semantic one.

Sizes are in estimated tokens (4 characters a token, the estimate the rate limiter uses), so no
tokenizer has to be downloaded. Both chunkers are pure functions of their input: the same text
and parameters always give the same chunks, which the content-hashed task ids rely on.

The simple chunker packs whole sentences up to the size, breaking at a sentence end, a blank
line or a list item; only a sentence longer than half a chunk is cut, at a space. It finds all
boundaries with one regular-expression pass, so it runs at tens of MB/s in pure Python.

The semantic chunker (``--chunker semantic``) cuts the same sentences where the meaning moves
on: it embeds every sentence through ``/v1/embeddings`` and breaks where the cosine distance
between neighbours is among the largest of the segment, still within the size limit.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

CHARS_PER_TOKEN = 4
# The end of a sentence (with closing quotes/brackets), a blank line, or a new list item/heading.
_BOUNDARY = re.compile(r"[.!?\u2026\u3002][\"'\u201d\u2019)\]]*\s+"  # a sentence end
                       r"|\n[ \t]*\n\s*"  # a blank line
                       r"|\n(?=[ \t]*(?:[-*+#>\u2022]|\d{1,3}[.)])\s)")  # a list item or heading
# A tail shorter than this share of a chunk is merged into the chunk before it.
MIN_TAIL = 0.25
# The semantic chunker breaks at neighbour distances above this percentile of the segment.
BREAK_PERCENTILE = 90.0
# Sentences per embeddings request and tokens per request (well under the APIs' 2,048 inputs).
SEGMENT_SENTENCES = 256
SEGMENT_CHUNKS = 32


@dataclass(frozen=True, slots=True)
class Chunk:
    start: int  # character offsets in the document
    end: int
    text: str


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def boundaries(text: str) -> list[int]:
    """Offsets where a sentence may start: 0, every boundary, and len(text)."""
    out = [0]
    out.extend(m.end() for m in _BOUNDARY.finditer(text))
    if out[-1] != len(text):
        out.append(len(text))
    return out


def _cut(text: str, start: int, limit: int, floor: int) -> int:
    """Where to cut a run with no sentence boundary: the last whitespace in (floor, limit], else limit."""
    for ws in (" ", "\n", "\t"):
        pos = text.rfind(ws, floor + 1, limit + 1)
        if pos > floor:
            return pos
    return limit


def chunk_text(text: str, size_tokens: int, overlap_tokens: int = 0) -> list[Chunk]:
    """Sentence-aware chunks of at most ``size_tokens`` (estimated), neighbours sharing about
    ``overlap_tokens`` of whole sentences. Whitespace-only pieces are dropped."""
    if size_tokens < 1:
        raise ValueError("chunk size must be >= 1 token")
    if overlap_tokens < 0 or overlap_tokens * 2 > size_tokens:
        raise ValueError("chunk overlap must be between 0 and half the chunk size")
    size = size_tokens * CHARS_PER_TOKEN
    overlap = overlap_tokens * CHARS_PER_TOKEN
    n = len(text)
    bounds = boundaries(text)
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        limit = start + size
        if n - start <= size or (n - limit < size * MIN_TAIL and n - start <= size * (1 + MIN_TAIL)):
            end = n
        else:
            i = bisect_right(bounds, limit) - 1
            end = bounds[i]
            if end <= start + size // 2:
                end = _cut(text, start, limit, start + size // 2)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            chunks.append(Chunk(start + lead, start + len(piece.rstrip()), piece.strip()))
        if end >= n:
            break
        nxt = end
        if overlap:
            j = bisect_left(bounds, end - overlap)
            if j < len(bounds) and bounds[j] < end:
                nxt = bounds[j]
            else:
                ws = text.find(" ", end - overlap, end)
                if ws >= 0:
                    nxt = ws + 1
        start = nxt if nxt > start else end
    return chunks


def sentences(text: str, max_tokens: int) -> list[tuple[int, int]]:
    """Sentence spans covering the text (whitespace stays with the sentence before it); a
    sentence longer than ``max_tokens`` is cut at spaces so every span can be embedded."""
    limit = max_tokens * CHARS_PER_TOKEN
    spans: list[tuple[int, int]] = []
    bounds = boundaries(text)
    for a, b in zip(bounds, bounds[1:], strict=False):
        while b - a > limit:
            cut = _cut(text, a, a + limit, a + limit // 2)
            spans.append((a, cut))
            a = cut
        if not text[a:b].strip() and spans:
            spans[-1] = (spans[-1][0], b)  # whitespace alone is not a sentence
        elif b > a:
            spans.append((a, b))
    if spans and not text[spans[0][0]:spans[0][1]].strip() and len(spans) > 1:
        spans[1] = (spans[0][0], spans[1][1])
        del spans[0]
    return [s for s in spans if text[s[0]:s[1]].strip()]


def segments(spans: Sequence[tuple[int, int]], size_tokens: int) -> list[tuple[int, int]]:
    """Groups of consecutive sentences (index ranges) for one embeddings request each; the
    semantic chunker never joins sentences of two segments, so a segment is many chunks long."""
    limit = SEGMENT_CHUNKS * size_tokens * CHARS_PER_TOKEN
    out: list[tuple[int, int]] = []
    first = 0
    chars = 0
    for i, (a, b) in enumerate(spans):
        if i > first and (i - first >= SEGMENT_SENTENCES or chars + (b - a) > limit):
            out.append((first, i))
            first, chars = i, 0
        chars += b - a
    if first < len(spans):
        out.append((first, len(spans)))
    return out


def _cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(math.fsum(x * x for x in a))
    nb = math.sqrt(math.fsum(y * y for y in b))
    if na == 0 or nb == 0:
        return 1.0
    return 1.0 - dot / (na * nb)


def _percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.inf
    k = (len(ordered) - 1) * pct / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def semantic_groups(lengths: Sequence[int], vectors: Sequence[Sequence[float]], size_tokens: int) -> list[
        tuple[int, int]]:
    """Index ranges of sentences forming chunks: cut where the distance to the next sentence is
    above the segment's ``BREAK_PERCENTILE`` (once a chunk holds a quarter of the size), and
    always before the size would be exceeded."""
    if len(lengths) != len(vectors):
        raise ValueError(f"{len(vectors)} embeddings for {len(lengths)} sentences")
    size = size_tokens * CHARS_PER_TOKEN
    dist = [_cosine_distance(vectors[i], vectors[i + 1]) for i in range(len(vectors) - 1)]
    threshold = _percentile(dist, BREAK_PERCENTILE) if len(dist) >= 3 else math.inf
    groups: list[tuple[int, int]] = []
    first, chars = 0, 0
    for i, n in enumerate(lengths):
        if i > first and chars + n > size:
            groups.append((first, i))
            first, chars = i, 0
        chars += n
        if i < len(dist) and dist[i] > threshold and dist[i] > 0 and chars >= size * MIN_TAIL:
            groups.append((first, i + 1))
            first, chars = i + 1, 0
    if first < len(lengths):
        if groups and chars < size * MIN_TAIL and chars + sum(lengths[groups[-1][0]:groups[-1][1]]) <= size:
            groups[-1] = (groups[-1][0], len(lengths))
        else:
            groups.append((first, len(lengths)))
    return groups
