"""``asyncraft export``: write the results of a state dir as JSONL or Parquet (by the file name)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from asyncraft import store
from asyncraft.errors import ConfigError
from asyncraft.jobs.base import InputProblem
from asyncraft.records import id_key

PARQUET_BATCH = 10_000


def results_index(sd: store.StateDir) -> tuple[dict[int, int], list[Path]]:
    """task key -> packed location of its final record (done wins over fail)."""
    paths: list[Path] = []
    path_ids: dict[Path, int] = {}
    index: dict[int, int] = {}
    done_keys: set[int] = set()
    for rec, loc in store.iter_records(sd):
        kind = rec.get("k")
        if kind not in ("done", "fail"):
            continue
        key = id_key(rec["id"])
        if kind == "fail" and key in done_keys:
            continue
        if kind == "done":
            done_keys.add(key)
        pid = path_ids.get(loc.path)
        if pid is None:
            pid = path_ids[loc.path] = len(paths)
            paths.append(loc.path)
        index[key] = (pid << 40) | loc.offset
    return index, paths


class _Reader:
    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._files: dict[int, Any] = {}

    def get(self, packed: int) -> dict[str, Any]:
        pid, offset = packed >> 40, packed & ((1 << 40) - 1)
        fh = self._files.get(pid)
        if fh is None:
            fh = self._files[pid] = open(self._paths[pid], "rb")  # noqa: SIM115 - closed in close()
        fh.seek(offset)
        rec = store.records.decode(fh.readline())
        if rec is None:
            raise ConfigError(f"{self._paths[pid]}: damaged record at byte {offset}; run `asyncraft verify`")
        return rec

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


def prompts_rows(sd: store.StateDir, input_path: Path, meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    from asyncraft.jobs.prompts import PromptsJob

    fp = meta.get("fingerprint", {})
    job = PromptsJob(input_path, model=fp.get("model"), extra_body=fp.get("extra_body") or {})
    index, paths = results_index(sd)
    reader = _Reader(paths)
    try:
        for item in job.roots():
            if isinstance(item, InputProblem):
                yield {"line": item.detail.get("line"), "custom_id": None, "status": "invalid",
                       "error": {"type": "input", "message": item.message}}
                continue
            row: dict[str, Any] = {"line": item.meta["line"], "custom_id": item.meta.get("custom_id")}
            packed = index.get(id_key(item.id))
            if packed is None:
                row["status"] = "pending"
                yield row
                continue
            rec = reader.get(packed)
            if rec["k"] == "done":
                msg = rec.get("message") or {}
                row.update(status="ok", content=msg.get("content"), finish_reason=rec.get("finish_reason"),
                           usage=rec.get("usage"), model=rec.get("model"))
                if msg.get("tool_calls"):
                    row["tool_calls"] = msg["tool_calls"]
            else:
                row.update(status="failed", error=rec.get("error"))
            yield row
    finally:
        reader.close()


def export(sd: store.StateDir, fmt: str, out: Path, *, input_override: str | None = None) -> dict[str, int]:
    meta = sd.read_meta()
    if meta is None:
        raise ConfigError(f"{sd.root} is not an asyncraft state dir (no asyncraft.json); pass --state-dir")
    job = meta.get("job")
    if fmt == "prompts":
        if job != "prompts":
            raise ConfigError(f"--format prompts needs a prompts job; {sd.root} holds a {job} job")
        input_path = Path(input_override or meta.get("input", ""))
        if not input_path.is_file():
            raise ConfigError(f"input file {input_path} not found; export reads it for the order of lines. "
                              "Pass --input PATH if it moved.")
        return write_rows(prompts_rows(sd, input_path, meta), out,
                          prompts_schema() if out.suffix == ".parquet" else None)
    raise ConfigError(f"--format {fmt} is not available for a {job} job")


def write_rows(rows: Iterator[dict[str, Any]], out: Path, schema: Any = None) -> dict[str, int]:
    """Write rows atomically to .jsonl or .parquet; returns counts by status."""
    counts: dict[str, int] = {}
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".parquet":
            if schema is None:
                raise ConfigError("this format has no Parquet layout; use .jsonl")
            _write_parquet(rows, tmp, counts, schema)
        elif out.suffix in (".jsonl", ".json", ""):
            with open(tmp, "wb") as fh:
                for row in rows:
                    counts[row.get("status", "ok")] = counts.get(row.get("status", "ok"), 0) + 1
                    fh.write(orjson.dumps(row) + b"\n")
        else:
            raise ConfigError(f"--out {out}: use a .jsonl or .parquet file name")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return counts


def prompts_schema() -> Any:
    import pyarrow as pa

    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
    return pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("status", pa.string()),
                      ("content", pa.string()), ("finish_reason", pa.string()), ("model", pa.string()),
                      ("usage", usage), ("tool_calls", pa.string()), ("error", pa.string())])


def _write_parquet(rows: Iterator[dict[str, Any]], path: Path, counts: dict[str, int], schema: Any) -> None:
    """Columns come from ``schema``; values that are not of a column's type (errors, tool calls) go in as JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = schema.names
    as_json = {f.name for f in schema if pa.types.is_string(f.type)}
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            counts[row.get("status", "ok")] = counts.get(row.get("status", "ok"), 0) + 1
            batch.append({k: (orjson.dumps(v).decode() if k in as_json and isinstance(v, dict | list) else v)
                          for k, v in ((n, row.get(n)) for n in names)})
            if len(batch) >= PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch.clear()
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
