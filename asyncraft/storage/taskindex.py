"""Which tasks a sealed run settles, findable by task id without reading the run: part of the run's index.

Each run's index holds its tasks sorted by id, one 32-byte entry per task (its state in the run, the rejected
attempts it paid for there, and where its deciding record is), in blocks of 128 entries with a CRC each, the
first id of every block (the fences), and a blocked Bloom filter of the ids (10 bits a task; the 7 bits of an
id are set in one 64-byte line, so a test reads one line: about 1% false positives) with a CRC for each 4 KiB.
Like the run, this is written once and never changed, so it travels with the run (to object storage too) and
never needs rebuilding.

Finding a task reads the small fence and CRC tables and the filter once per run, then for each lookup tests one
filter line and, when the filter says maybe, reads one 4 KiB block; each block's CRC is checked the first time
it is used. The cost of a lookup grows with the number of runs (one filter line each), not with the number of
tasks in them.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncraft.records import Kind

TASK = struct.Struct("<16sBBHIII")  # id, state, pad, attempts (capped), frame, offset in frame, seq - first
BLOCK_TASKS = 128
BLOCK = BLOCK_TASKS * TASK.size
BLOOM_BLOCK = 4096  # bytes of filter under one CRC
FILTER_LINE = 64  # bytes: all the bits of one id are in one of these
BITS_PER_TASK = 10
PROBES = 7
NONE, DONE, FAILED, IERR, RESOLVED = 0, int(Kind.DONE), int(Kind.FAIL), int(Kind.IERR), int(Kind.RESOLVED)


class RunDamage(Exception):
    """A run or its index does not hold what it should; ``offset`` is a byte offset in ``path``."""

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(f"{path}: {problem} (at byte {offset})")
        self.path = path
        self.offset = offset
        self.problem = problem


def merge_state(old: int, new: int) -> int:
    """Done beats everything; a failure beats an input problem and nothing; a problem resolved beats the problem;
    an input problem only fills nothing."""
    if old == DONE or new == DONE:
        return DONE
    if old == FAILED or new == FAILED:
        return FAILED
    if old == RESOLVED or new == RESOLVED:
        return RESOLVED
    return old or new


@dataclass(slots=True)
class TaskEntry:
    state: int
    attempts: int
    frame: int
    offset: int
    seq: int  # absolute seq of the deciding record (0: none, only attempts)


def hashes(key: bytes) -> tuple[int, int]:
    """(which filter line, the bits to test in it) for a task id. Ids are uniform hashes: their halves will do."""
    h1 = int.from_bytes(key[:8], "little")
    h2 = int.from_bytes(key[8:], "little")
    mask = 0
    for i in range(PROBES):
        mask |= 1 << ((h2 >> (9 * i)) & 511)
    return h1, mask


def build_sections(tasks: dict[bytes, list[int]]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The task sections of a run's index from ``id -> [state, attempts, frame, offset, seq - first]``."""
    ordered = sorted(tasks.items())
    table = b"".join(TASK.pack(k, v[0], 0, min(v[1], 0xFFFF), v[2], v[3], v[4]) for k, v in ordered)
    n_blocks = (len(ordered) + BLOCK_TASKS - 1) // BLOCK_TASKS
    fences = b"".join(ordered[i * BLOCK_TASKS][0] for i in range(n_blocks))
    block_crcs = b"".join(struct.pack("<I", zlib.crc32(table[i * BLOCK : (i + 1) * BLOCK])) for i in range(n_blocks))
    lines = max(BLOOM_BLOCK // FILTER_LINE, (len(ordered) * BITS_PER_TASK + FILTER_LINE * 8 - 1) // (FILTER_LINE * 8))
    lines = (lines + BLOOM_BLOCK // FILTER_LINE - 1) // (BLOOM_BLOCK // FILTER_LINE) * (BLOOM_BLOCK // FILTER_LINE)
    words = [0] * lines
    for key, _v in ordered:
        h1, mask = hashes(key)
        words[h1 % lines] |= mask
    bloom = b"".join(w.to_bytes(FILTER_LINE, "little") for w in words)
    m = lines * FILTER_LINE * 8
    bloom_crcs = b"".join(struct.pack("<I", zlib.crc32(bloom[i : i + BLOOM_BLOCK]))
                          for i in range(0, len(bloom), BLOOM_BLOCK))
    sections = {"tasks": table, "fences": fences, "block_crcs": block_crcs, "bloom": bloom,
                "bloom_crcs": bloom_crcs}
    return sections, {"tasks": len(ordered), "bloom_m": m}


class RunTasks:
    """Task lookups in one run's index: the small tables and the filter are read at open, a block of the sorted
    table from the file when the filter says maybe.

    Nothing stays mapped or open. A memory map of the index grew the process's resident size with every lookup
    (the kernel maps a whole folio of the page cache, up to 512 KiB, around each page touched: 3.5 MiB of each
    6 MiB index after 1,000 lookups, 400 MB at 10M tasks), and held a file descriptor per run. The filter in
    memory is 1.25 bytes a task."""

    def __init__(self, path: Path, body_start: int, header: dict[str, Any]) -> None:
        self.path = path
        self.first = int(header["first"])
        self.last = int(header["last"])
        sections = header["sections"]
        self.n = int(header["tasks"])
        self.m = int(header["bloom_m"])
        self._at: dict[str, int] = {}
        small: dict[str, bytes] = {}
        with open(path, "rb") as fh:
            for name, (offset, length, crc) in sections.items():
                start = body_start + offset
                self._at[name] = start
                if name in ("fences", "block_crcs", "bloom_crcs", "bloom"):
                    fh.seek(start)
                    blob = fh.read(length)
                    if len(blob) != length:
                        raise RunDamage(path, start, f"task index section {name} is cut short")
                    if name != "bloom" and zlib.crc32(blob) != crc:  # the filter is checked a block at a time
                        raise RunDamage(path, start, f"task index section {name} is damaged")
                    small[name] = blob
        self._fences = [small["fences"][i : i + 16] for i in range(0, len(small["fences"]), 16)]
        self._block_crcs = struct.unpack(f"<{len(self._fences)}I", small["block_crcs"])
        n_bloom = len(small["bloom_crcs"]) // 4
        self._bloom_crcs = struct.unpack(f"<{n_bloom}I", small["bloom_crcs"])
        self._block_ok = bytearray(len(self._fences))
        self._bloom_ok = bytearray(n_bloom)
        self._bloom = small["bloom"]
        self._lines = self.m // (FILTER_LINE * 8)

    def close(self) -> None:
        """Nothing to release (kept so that owners need not know)."""

    def check_bloom_block(self, blk: int) -> None:
        start = blk * BLOOM_BLOCK
        if zlib.crc32(self._bloom[start : start + BLOOM_BLOCK]) != self._bloom_crcs[blk]:
            raise RunDamage(self.path, self._at["bloom"] + start, "task filter block is damaged")
        self._bloom_ok[blk] = 1

    def maybe(self, h1: int, mask: int) -> bool:
        """Whether the filter may hold the task whose id gives ``h1``, ``mask`` (see ``hashes``)."""
        at = (h1 % self._lines) * FILTER_LINE
        if not self._bloom_ok[at // BLOOM_BLOCK]:
            self.check_bloom_block(at // BLOOM_BLOCK)
        return int.from_bytes(self._bloom[at : at + FILTER_LINE], "little") & mask == mask

    def filter_params(self) -> tuple[int, bytes, bytearray]:
        """What a tight loop over many runs needs to test the filter inline (see ``tasks.lookup``)."""
        return self._lines, self._bloom, self._bloom_ok

    def get(self, key: bytes, h: tuple[int, int] | None = None) -> TaskEntry | None:
        """The task's entry in this run, or None. ``h`` is ``hashes(key)``, when the caller has it."""
        h1, mask = h if h is not None else hashes(key)
        if not self.n or not self.maybe(h1, mask):
            return None
        return self.find(key)

    def find(self, key: bytes) -> TaskEntry | None:
        """The task's entry, searched in the sorted blocks (without asking the filter)."""
        b = bisect.bisect_right(self._fences, key) - 1
        if b < 0:
            return None
        block = self._block(b)
        pos = block.find(key)
        while pos >= 0 and pos % TASK.size:
            pos = block.find(key, pos + 1)
        if pos < 0:
            return None
        _k, state, _pad, attempts, frame, offset, seqoff = TASK.unpack_from(block, pos)
        return TaskEntry(state, attempts, frame, offset, self.first + seqoff if state else 0)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise RunDamage(self.path, 0, "task index is missing") from None

    def _block(self, b: int, fd: int | None = None) -> bytes:
        start = self._at["tasks"] + b * BLOCK
        length = min(BLOCK, self.n * TASK.size - b * BLOCK)
        if fd is not None:
            blob = os.pread(fd, length, start)
        else:
            fd = self._open()
            try:
                blob = os.pread(fd, length, start)
            finally:
                os.close(fd)
        if not self._block_ok[b]:
            if zlib.crc32(blob) != self._block_crcs[b]:
                raise RunDamage(self.path, start, "task index block is damaged")
            self._block_ok[b] = 1
        return blob

    def entries(self) -> list[tuple[bytes, TaskEntry]]:
        """Every task of the run, in id order (for counting states from scratch)."""
        out = []
        fd = self._open()
        try:
            blocks = [self._block(b, fd) for b in range(len(self._fences))]
        finally:
            os.close(fd)
        for block in blocks:
            for i in range(0, len(block), TASK.size):
                k, state, _pad, attempts, frame, offset, seqoff = TASK.unpack_from(block, i)
                out.append((k, TaskEntry(state, attempts, frame, offset, self.first + seqoff if state else 0)))
        return out
