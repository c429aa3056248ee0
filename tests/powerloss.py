"""A model of what a power cut leaves on disk, built from the operation log of ``storage.fs.RecordingFS``.

The approach of ALICE and CrashMonkey (and of SQLite's crash-test VFS): replay the logged operations onto a
model that knows, for every file, what is durable (synced) and what is only in the page cache, and for every
directory, which names are durable. At each sync point (just before every fsync, fdatasync or directory fsync,
and at the end) it materialises the disk states a power cut could leave there:

- nothing unsynced kept (only what was synced), or everything kept (what kill -9 leaves);
- names made durable but data not (or data but not names), and every prefix of the unsynced directory
  operations (creates, renames, unlinks are journaled in order by ext4 and XFS);
- the last unsynced write torn (a prefix kept);
- unsynced data kept out of order: a later block kept while an earlier one reads as zeros (a hole).

The lock and the views for people (status.json, errors.jsonl) are left out: recovery does not read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 4096
SKIP = ("lock", "status.json", "errors.jsonl")


@dataclass
class Inode:
    data: bytearray
    durable: bytes
    pending: list[tuple[int, int]] = field(default_factory=list)  # unsynced writes: (offset, length)


@dataclass
class CrashState:
    label: str
    at: int  # index of the operation before which the power was cut
    acked: int  # records acknowledged before that point (seq)
    files: dict[str, bytes]

    def materialise(self, root: Path) -> None:
        for d in ("journal", "runs", "snapshots", "damaged"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _skip(rel: str) -> bool:
    return rel in SKIP


def snapshot_files(root: Path) -> dict[str, bytes]:
    """The files under ``root`` (all taken as durable: the starting point of a recording)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            if not _skip(rel):
                out[rel] = path.read_bytes()
    return out


class DiskModel:
    def __init__(self, root: Path, initial: dict[str, bytes]) -> None:
        self.root = root
        self.current: dict[str, Inode] = {}
        self.durable: dict[str, Inode] = {}
        self.dir_ops: list[tuple[Any, ...]] = []  # unsynced namespace operations, in order
        for rel, data in initial.items():
            inode = Inode(bytearray(data), data)
            self.current[rel] = self.durable[rel] = inode
        self.acked = 0

    def _rel(self, p: Any) -> str | None:
        """``p`` relative to the state dir; None outside it (the state dir's own parent, when it is made)."""
        path, root = Path(p).resolve(), self.root.resolve()
        if path == root:
            return ""
        if root not in path.parents:
            return None
        return path.relative_to(root).as_posix()

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "note":
            if op[1] == "ack":
                self.acked = max(self.acked, int(op[2]))
            return
        if kind == "mkdir":
            return
        if kind == "sync_dir":
            d = self._rel(op[1])
            if d is not None:
                self._sync_dir(d)
            return
        rel = self._rel(op[1])
        if rel is None or _skip(rel):
            return
        if kind == "create":
            inode = self.current[rel] = Inode(bytearray(), b"")
            self.dir_ops.append(("create", rel, inode))
        elif kind == "write":
            offset, data = op[2], op[3]
            inode = self.current[rel]
            if len(inode.data) < offset:
                inode.data.extend(bytes(offset - len(inode.data)))
            inode.data[offset : offset + len(data)] = data
            inode.pending.append((offset, len(data)))
        elif kind == "sync":
            inode = self.current[rel]
            inode.durable = bytes(inode.data)
            inode.pending.clear()
        elif kind == "truncate":
            inode = self.current[rel]
            del inode.data[op[2]:]
        elif kind == "rename":
            dst = self._rel(op[2])
            assert dst is not None
            inode = self.current[dst] = self.current.pop(rel)
            self.dir_ops.append(("rename", rel, dst, inode))
        elif kind == "unlink":
            self.current.pop(rel, None)
            self.dir_ops.append(("unlink", rel))
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _sync_dir(self, d: str) -> None:
        def in_dir(rel: str) -> bool:
            return (rel.rpartition("/")[0]) == d

        keep = []
        for op in self.dir_ops:
            if all(in_dir(p) for p in op[1:] if isinstance(p, str)):
                if op[0] == "create":
                    self.durable[op[1]] = op[2]
                elif op[0] == "rename":
                    self.durable.pop(op[1], None)
                    self.durable[op[2]] = op[3]
                elif op[0] == "unlink":
                    self.durable.pop(op[1], None)
            else:
                keep.append(op)
        self.dir_ops = keep

    # -- crash states ---------------------------------------------------------------------------------

    def _namespace(self, upto: int) -> dict[str, Inode]:
        """The durable names plus the first ``upto`` unsynced directory operations."""
        ns = dict(self.durable)
        for op in self.dir_ops[:upto]:
            if op[0] == "create":
                ns[op[1]] = op[2]
            elif op[0] == "rename":
                ns.pop(op[1], None)
                ns[op[2]] = op[3]
            elif op[0] == "unlink":
                ns.pop(op[1], None)
        return ns

    def states(self, at: int) -> Iterator[CrashState]:
        n = len(self.dir_ops)
        seen: set[str] = set()

        def emit(label: str, files: dict[str, bytes]) -> Iterator[CrashState]:
            digest = hashlib.blake2b(repr(sorted(files.items())).encode(), digest_size=16).hexdigest()
            if digest not in seen:
                seen.add(digest)
                yield CrashState(label, at, self.acked, files)

        for upto in sorted({0, n, *range(1, n)}):
            ns = self._namespace(upto)
            yield from emit(f"names+{upto}/{n}, synced data", {k: v.durable for k, v in ns.items()})
            yield from emit(f"names+{upto}/{n}, all data", {k: bytes(v.data) for k, v in ns.items()})
        ns_all = self._namespace(n)
        pending = [(k, v) for k, v in ns_all.items() if v.pending]
        for rel, inode in pending:
            base = {k: bytes(v.data) for k, v in ns_all.items()}
            off, length = inode.pending[-1]
            for frac in (1, 2):
                cut = off + max(1, length * frac // 3)
                torn = bytes(inode.data[:cut])
                yield from emit(f"{rel} torn at {cut}", {**base, rel: torn})
            # Out of order: the first unsynced block is a hole, what follows it was written.
            start = len(inode.durable)
            end = min(len(inode.data), (start // BLOCK + 1) * BLOCK)
            if end > start:
                holed = bytearray(inode.data)
                holed[start:end] = bytes(end - start)
                yield from emit(f"{rel} hole at {start}..{end}", {**base, rel: bytes(holed)})


def crash_states(root: Path, initial: dict[str, bytes], ops: list[tuple[Any, ...]]) -> Iterator[CrashState]:
    """Every crash state at every sync point of ``ops``, replayed onto ``initial`` (the files before them)."""
    model = DiskModel(root, initial)
    for i, op in enumerate(ops):
        if op[0] in ("sync", "sync_dir"):
            yield from model.states(i)
        model.apply(op)
    yield from model.states(len(ops))
