"""Compaction: sealed journal segments become one sealed run, then a manifest names it, then the segments go.

Each step is durable before the next starts, so a crash (or power cut) between any two leaves a state the
resolver reads without loss: the run is written and synced before its index, the index before the manifest,
the manifest before the segments are released. Cost grows with the records compacted, not with history:
runs are immutable and the manifest only lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncraft import records
from asyncraft.storage import runfile
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import StateDir, manifest_name
from asyncraft.storage.runfile import RunHeader

log = logging.getLogger("asyncraft.storage")

KEEP_MANIFESTS = 2


@dataclass
class Compacted:
    header: RunHeader
    chain: list[dict[str, Any]]  # the manifest's runs after this compaction


def manifest_entry(header: RunHeader) -> dict[str, Any]:
    return {"name": header.name, "first": header.first, "last": header.last, "bytes": header.data_bytes,
            "count": header.count}


def segment_lines(segments: list[tuple[int, int, Path]]) -> Iterator[bytes]:
    """The records of sealed segments, in order (the writer checked and synced them)."""
    for first, last, path in segments:
        data = path.read_bytes()
        pos = 0
        seq = first
        while pos < len(data) and seq <= last:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            yield data[pos : nl + 1]
            pos = nl + 1
            seq += 1


def write_manifest(fs: FS, sd: StateDir, chain: list[dict[str, Any]], seq: int, counts: dict[str, int]) -> None:
    """The manifest naming ``chain`` (which covers seq 1..``seq``), with the task counts through ``seq``."""
    manifest = records.encode({"k": "manifest", "v": 2, "seq": seq, "runs": chain, "next": seq + 1,
                               "counts": counts, "t": round(time.time(), 3)})
    fs.write_atomic(sd.snapshots / manifest_name(seq), manifest, mid="snapshot.mid_write",
                    after_rename="snapshot.after_rename")


def compact(fs: FS, sd: StateDir, segments: list[tuple[int, int, Path]], chain: list[dict[str, Any]],
            counts: dict[str, int], made: Callable[[Path, Path, Path], None] | None = None) -> Compacted:
    """Turn sealed segments (each ending with its seal) into one run; the next segment already exists.
    ``counts`` are the task counts through the last seq of the segments. ``made(run, index, manifest)`` is
    told once the manifest is durable, before the segments it covers go (the object-store replica's hook)."""
    first = segments[0][0]
    data, index_blob, header = runfile.build_run(segment_lines(segments), first)
    fs.write_atomic(sd.runs / header.name, data)
    fs.fp.hit("compact.mid_index")
    fs.write_atomic(runfile.index_path_for(sd.runs / header.name), index_blob)
    new_chain = [*chain, manifest_entry(header)]
    write_manifest(fs, sd, new_chain, header.last, counts)
    if made is not None:
        made(sd.runs / header.name, runfile.index_path_for(sd.runs / header.name),
             sd.snapshots / manifest_name(header.last))
    fs.fp.hit("snapshot.before_release")
    for _first, _last, path in segments:
        fs.unlink(path)
    fs.fsync_dir(sd.journal)
    for _seq, old in sd.manifests()[KEEP_MANIFESTS:]:
        fs.unlink(old)
    return Compacted(header, new_chain)
