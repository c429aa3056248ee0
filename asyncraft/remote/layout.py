"""What the bucket holds and what it means: object keys, the head, and which objects form the state.

Layout under the state URL::

    lease.json                                   the head: lease (owner, generation, renewal time) and the
                                                 newest durable manifest and asyncraft.json; updated only
                                                 with If-Match, so only the owner moves it
    g/<gen>/start.json                           written create-only by each owner right after taking the
                                                 lease: which earlier generations' journal chunks it adopted
    g/<gen>/j/<segment file>/<offset>-<end>-<last seq>   bytes [offset, end) of a journal segment
    g/<gen>/f/runs/..., g/<gen>/f/snapshots/...  immutable files, under their local names
    g/<gen>/m/<n>/asyncraft.json                 the n-th asyncraft.json this generation uploaded

Every object except lease.json is created once and never overwritten, and each owner writes only under
its own generation. An old owner that wakes up after a takeover can still add objects under its old
generation, but they are ignored: a generation's journal chunks count only up to the sequence number its
successor adopted (``start.json``), and manifests and runs count only when the head names them.

Everything here is pure (no I/O), so the rules are tested without a store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from asyncraft.remote.client import Entry
from asyncraft.remote.errors import RemoteStateError

FORMAT = 1
LEASE = "lease.json"
META_NAME = "asyncraft.json"
_GEN = re.compile(r"^g/(\d{10})/(.+)$")
_CHUNK = re.compile(r"^j/([^/]+)/(\d{16})-(\d{16})-(\d{12})$")
_META = re.compile(r"^m/(\d{6})/asyncraft\.json$")


def gen_prefix(gen: int) -> str:
    return f"g/{gen:010d}/"


def start_key(gen: int) -> str:
    return gen_prefix(gen) + "start.json"


def chunk_key(gen: int, segment: str, offset: int, end: int, last: int) -> str:
    return f"{gen_prefix(gen)}j/{segment}/{offset:016d}-{end:016d}-{last:012d}"


def file_key(gen: int, name: str) -> str:
    return gen_prefix(gen) + "f/" + name


def meta_key(gen: int, n: int) -> str:
    return f"{gen_prefix(gen)}m/{n:06d}/{META_NAME}"


def segment_first(name: str) -> int:
    """``000000000042.jsonl`` -> 42: journal segments are named by their first sequence number."""
    head = name.partition(".")[0]
    if not head.isdigit():
        raise ValueError(f"journal segment {name!r} is not named <first-seq>.<ext>")
    return int(head)


def manifest_seq(name: str) -> int:
    """``snapshots/manifest-000000001234.json`` -> 1234: a manifest covers seq 1..this."""
    m = re.fullmatch(r"(?:.*/)?manifest-(\d+)\.json", name)
    if not m:
        raise ValueError(f"manifest {name!r} is not named snapshots/manifest-<seq>.json")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------------
# the head (lease.json)


@dataclass(frozen=True, slots=True)
class ManifestRef:
    name: str  # local name, snapshots/manifest-<seq>.json
    seq: int
    key: str
    files: dict[str, str]  # local name of every file the manifest names -> its object key


@dataclass(frozen=True, slots=True)
class Head:
    generation: int
    holder: str
    write_id: str  # unique per write: tells our own lost-reply update from somebody else's
    renewed_at: float  # wall clock of the holder; 0 = released
    ttl: float
    manifest: ManifestRef | None = None
    meta: str | None = None

    def expired(self, now: float) -> bool:
        return now >= self.renewed_at + self.ttl

    def encode(self) -> bytes:
        m = self.manifest
        body: dict[str, Any] = {
            "format": FORMAT, "generation": self.generation, "holder": self.holder, "write_id": self.write_id,
            "renewed_at": self.renewed_at, "ttl": self.ttl, "meta": self.meta,
            "manifest": None if m is None else {"name": m.name, "seq": m.seq, "key": m.key, "files": m.files},
        }
        return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"

    @classmethod
    def decode(cls, data: bytes, where: str) -> Head:
        try:
            body = orjson.loads(data)
            if body.get("format") != FORMAT:
                raise RemoteStateError(f"{where} has format {body.get('format')!r}; this asyncraft reads {FORMAT}")
            m = body["manifest"]
            ref = None if m is None else ManifestRef(str(m["name"]), int(m["seq"]), str(m["key"]),
                                                     {str(k): str(v) for k, v in m["files"].items()})
            return cls(int(body["generation"]), str(body["holder"]), str(body["write_id"]),
                       float(body["renewed_at"]), float(body["ttl"]), ref,
                       None if body["meta"] is None else str(body["meta"]))
        except RemoteStateError:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise RemoteStateError(f"{where} is damaged (not a lease/head object of asyncraft)") from None


@dataclass(frozen=True, slots=True)
class Start:
    """An owner's start: the generations before it, each with the last seq of its adopted journal."""

    generation: int
    chain: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        return orjson.dumps({"format": FORMAT, "generation": self.generation, "chain": self.chain}) + b"\n"

    @classmethod
    def decode(cls, data: bytes, where: str) -> Start:
        try:
            body = orjson.loads(data)
            return cls(int(body["generation"]), tuple((int(g), int(s)) for g, s in body["chain"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise RemoteStateError(f"{where} is damaged") from None


# ---------------------------------------------------------------------------------------------------
# the listing


@dataclass(frozen=True, slots=True, order=True)
class Chunk:
    first: int  # the segment's first seq: sorts segments in journal order
    offset: int
    end: int
    last: int  # seq of the last record in [offset, end)
    segment: str
    generation: int
    key: str


@dataclass
class Generation:
    start: bool = False
    chunks: list[Chunk] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # local name -> key
    metas: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # ours but not understood (a newer format?): left alone

    def keys(self) -> list[str]:
        return [c.key for c in self.chunks] + list(self.files.values()) + self.metas


def parse_listing(entries: Iterable[Entry]) -> dict[int, Generation]:
    gens: dict[int, Generation] = {}
    for e in entries:
        m = _GEN.match(e.key)
        if not m:
            continue
        gen = int(m.group(1))
        g = gens.setdefault(gen, Generation())
        rest = m.group(2)
        if rest == "start.json":
            g.start = True
        elif c := _CHUNK.match(rest):
            segment, offset, end, last = c.group(1), int(c.group(2)), int(c.group(3)), int(c.group(4))
            try:
                first = segment_first(segment)
            except ValueError:
                g.other.append(e.key)
                continue
            g.chunks.append(Chunk(first, offset, end, last, segment, gen, e.key))
        elif rest.startswith("f/"):
            g.files[rest[2:]] = e.key
        elif _META.match(rest):
            g.metas.append(e.key)
        else:
            g.other.append(e.key)
    return gens


# ---------------------------------------------------------------------------------------------------
# the view: which journal chunks make the state


@dataclass
class View:
    """The journal the store holds after the head's manifest: whole segments, each a run of chunks from 0."""

    manifest_seq: int
    segments: dict[str, list[Chunk]]  # needed segments in journal order, chunks contiguous from offset 0
    end_seq: int  # every record up to here is in the store (manifest or chunks)
    chain: tuple[tuple[int, int], ...]  # closed generations (gen, through seq)
    open_generation: int | None  # the newest generation with a start.json; its window is open

    def ends(self) -> dict[str, int]:
        return {name: chunks[-1].end for name, chunks in self.segments.items()}


def windows(start: Start | None) -> list[tuple[int, float, float]]:
    """(generation, lo, hi]: the seq range of journal chunks each generation in the chain contributes."""
    if start is None:
        return []
    out: list[tuple[int, float, float]] = []
    lo = 0.0
    for gen, through in start.chain:
        out.append((gen, lo, float(through)))
        lo = max(lo, float(through))
    out.append((start.generation, lo, math.inf))
    return out


def resolve(head: Head | None, start: Start | None, gens: dict[int, Generation]) -> View:
    """The state's journal: chunks of each generation within its window, contiguous from the manifest on.

    A gap inside the closed windows means an adopted object is missing: damage. A gap in the open window
    is where the newest owner's uploads stop (or where a stale owner's late uploads begin): the view ends.
    """
    mseq = head.manifest.seq if head and head.manifest else 0
    wins = windows(start)
    closed: set[str] = set()
    valid: list[Chunk] = []
    for gen, lo, hi in wins:
        for c in gens.get(gen, Generation()).chunks:
            if lo < c.last <= hi:
                valid.append(c)
                if hi != math.inf:
                    closed.add(c.key)
    valid.sort()
    by_segment: dict[str, list[Chunk]] = {}
    for c in valid:
        by_segment.setdefault(c.segment, []).append(c)
    segments: dict[str, list[Chunk]] = {}
    end_seq = mseq
    dropped: list[Chunk] = []
    broken = False
    for name, chunks in by_segment.items():
        if broken:
            dropped.extend(chunks)
            continue
        if chunks[-1].last <= mseq:
            continue  # covered by the manifest's runs
        # The first segment after the manifest may start at or before its seq; later ones follow on exactly.
        first = chunks[0].first
        if first > end_seq + 1 or (segments and first != end_seq + 1):
            broken = True
            dropped.extend(chunks)
            continue
        kept: list[Chunk] = []
        pos = 0
        for c in chunks:
            if broken or c.offset != pos:
                broken = True
                dropped.append(c)
                continue
            kept.append(c)
            pos = c.end
        if kept:
            segments[name] = kept
            end_seq = max(end_seq, kept[-1].last)
    lost = [c.key for c in dropped if c.key in closed]
    if lost:
        raise RemoteStateError(f"the store's journal is missing an object before {lost[0]} "
                               f"({len(lost)} adopted chunk(s) cannot be placed)")
    return View(mseq, segments, end_seq, start.chain if start else (), start.generation if start else None)


def next_start(gen: int, previous: Start | None, view: View) -> Start:
    """The start object of a new owner: the chain so far, the previous open generation closed at the view."""
    if previous is None:
        return Start(gen, ())
    return Start(gen, (*previous.chain, (previous.generation, view.end_seq)))


def garbage(head: Head, start: Start, gens: dict[int, Generation], superseded: set[str]) -> list[str]:
    """Objects the head no longer needs, for the owner ``start.generation`` to delete after moving the head.

    Newer generations are never touched: a newer owner's objects are not ours to judge. In earlier
    generations everything not named by the head goes: journal chunks past their generation's window (an
    old owner's late uploads) and chunks of segments the head's manifest covers (when a later segment
    exists), files and asyncraft.json copies the head does not name; a generation's start.json goes last,
    once nothing else of it is left. In the owner's own generation only covered chunks and ``superseded``
    (what earlier heads of this owner named) go, since its other files may belong to a manifest in flight.
    """
    mine = start.generation
    keep: set[str] = set()
    if head.manifest:
        keep.add(head.manifest.key)
        keep.update(head.manifest.files.values())
    if head.meta:
        keep.add(head.meta)
    limits = {gen: (lo, hi) for gen, lo, hi in windows(start)}

    def valid(c: Chunk) -> bool:
        lo, hi = limits.get(c.generation, (math.inf, -math.inf))
        return lo < c.last <= hi

    chunks = [c for gen, g in gens.items() if gen <= mine for c in g.chunks]
    newest_first = max((c.first for c in chunks if valid(c)), default=0)
    last_in: dict[str, int] = {}
    for c in chunks:
        if valid(c):
            last_in[c.segment] = max(last_in.get(c.segment, 0), c.last)
    mseq = head.manifest.seq if head.manifest else 0
    covered = {s for s, last in last_in.items() if last <= mseq and segment_first(s) < newest_first}
    out: list[str] = []
    starts: list[str] = []
    for gen in sorted(gens):
        if gen > mine:
            break
        g = gens[gen]
        if gen == mine:
            out.extend(c.key for c in g.chunks if c.segment in covered)
            out.extend(k for k in [*g.files.values(), *g.metas] if k in superseded and k not in keep)
            continue
        left = len(g.other)
        for c in g.chunks:
            if not valid(c) or c.segment in covered:
                out.append(c.key)
            else:
                left += 1
        for key in [*g.files.values(), *g.metas]:
            if key in keep:
                left += 1
            else:
                out.append(key)
        if g.start and left == 0:
            starts.append(start_key(gen))
    return out + starts
