"""``asyncraft export``: write the results of a state dir as JSONL or Parquet (by the file name)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from asyncraft.errors import ConfigError, Incomplete, StateDamaged
from asyncraft.jobs.base import Task
from asyncraft.records import id_key
from asyncraft.responses import batch_done, batch_failed, batch_id, batch_line, batch_status, result_fields
from asyncraft.storage import Recovery, open_read_only, readers
from asyncraft.storage.layout import StateDir
from asyncraft.storage.taskindex import DONE, RunDamage

if TYPE_CHECKING:
    from asyncraft.config import Settings
    from asyncraft.jobs.prompts import InputLine, PromptsJob
    from asyncraft.jobs.raft import ChunkInfo

log = logging.getLogger("asyncraft")

PARQUET_BATCH = 10_000
RAFT_FORMATS = ("raft", "chat", "completion", "eval")


def prompts_job(input_path: Path, meta: dict[str, Any]) -> PromptsJob:
    """The job as the state dir's fingerprint made it (model, extra body, samples), reading ``input_path``."""
    from asyncraft.jobs.prompts import PromptsJob

    fp = meta.get("fingerprint", {})
    return PromptsJob(input_path, model=fp.get("model"), extra_body=fp.get("extra_body") or {},
                      samples=int(fp.get("samples") or 1))


def line_results(rec: Recovery, job: PromptsJob) -> Iterator[tuple[InputLine, Task | None, str, dict[str, Any]]]:
    """(line, task, state, deciding record) of every line and sample, in input order: each task is looked up
    by id (memory does not grow with the number of results). A blank or invalid line comes once, with no task;
    state is "done", "failed", "pending", "invalid" or "blank"."""
    with readers.Reader() as reader:
        for line in job.lines():
            if not line.tasks:
                yield line, None, "invalid" if line.problem is not None else "blank", {}
                continue
            for task in line.tasks:
                state, loc = readers.deciding_location(rec, id_key(task.id))
                if loc is None:
                    yield line, task, "pending", {}
                else:
                    yield line, task, "done" if state == DONE else "failed", reader.read(loc)


def _common(line: InputLine, task: Task | None, samples: int) -> dict[str, Any]:
    """custom_id, sample and metadata of a line, as the input has them now."""
    out: dict[str, Any] = {}
    if task is None:
        out["custom_id"] = line.problem.detail.get("custom_id") if line.problem is not None else None
        return out
    out["custom_id"] = task.meta.get("custom_id")
    if samples > 1:
        out["sample"] = task.meta.get("sample", 0)
    if task.private:
        out["metadata"] = task.private
    return out


def prompts_rows(rec: Recovery, job: PromptsJob) -> Iterator[dict[str, Any]]:
    """One row per input line (and sample), in input order."""
    for line, task, state, r in line_results(rec, job):
        row: dict[str, Any] = {"line": line.line, **_common(line, task, job.samples)}
        if state == "done":
            row.update(status="ok", **result_fields(r))
        elif state == "failed":
            row.update(status="failed", error=r.get("error"))
        elif state == "invalid":
            assert line.problem is not None
            row.update(status="invalid", error={"type": "input", "message": line.problem.message})
        else:
            row["status"] = state
        yield row


def batch_rows(rec: Recovery, job: PromptsJob) -> Iterator[dict[str, Any]]:
    """One OpenAI Batch API output line per input line (and sample), in input order."""
    for line, task, state, r in line_results(rec, job):
        common = _common(line, task, job.samples)
        custom_id = common.pop("custom_id")
        bid = batch_id(line.line, common.get("sample"), task.id if task is not None else None)
        if state == "done":
            row = batch_line(custom_id, bid, response=batch_done(r))
        elif state == "failed":
            response, error = batch_failed(r)
            row = batch_line(custom_id, bid, response=response, error=error)
        elif state == "invalid":
            assert line.problem is not None
            row = batch_line(custom_id, bid, error={"code": "invalid_request", "message": line.problem.message})
        elif state == "blank":
            row = batch_line(custom_id, bid, error={"code": "blank_line", "message": f"line {line.line} is blank"})
        else:
            row = batch_line(custom_id, bid, error={"code": "pending", "message": "no result yet (a partial export)"})
        yield {**row, **common}


Written = list[tuple[Path, dict[str, int]]]  # each file written, with its rows counted by status


def export(sd: StateDir, fmt: str, out: Path, *, input_override: str | None = None,
           settings: Settings | None = None, partial: bool = False) -> Written:
    """Write the results; refuse damage and (prompts) unfinished lines unless ``partial``."""
    rec = open_read_only(sd)
    meta = rec.view.meta
    if meta is None:
        rec.view.refuse_if_damaged(action="export")
        raise ConfigError(f"{sd.root} is not an asyncraft state dir (no asyncraft.json); pass --state-dir")
    if rec.view.damage:
        if not partial:
            rec.view.refuse_if_damaged(action="export")
        for f in rec.view.damage:
            log.warning("exporting what is readable; missing: %s", f)
    job = meta.get("job")
    try:
        if fmt in RAFT_FORMATS:
            if job != "raft":
                raise ConfigError(f"--format {fmt} needs a raft job; {sd.root} holds a {job} job (use --format {job})")
            from asyncraft.config import Settings

            refuse_unfinished_raft(rec, partial)
            return export_raft(rec, meta, fmt, out, settings or Settings())
        if fmt in ("prompts", "batch"):
            if job != "prompts":
                raise ConfigError(f"--format {fmt} needs a prompts job; {sd.root} holds a {job} job")
            input_path = Path(input_override or meta.get("input", ""))
            if not input_path.is_file():
                raise ConfigError(f"input file {input_path} not found; export reads it for the order of lines. "
                                  "Pass --input PATH if it moved.")
            pjob = prompts_job(input_path, meta)
            parquet = out.suffix == ".parquet"
            if fmt == "batch":
                counts = write_rows(batch_rows(rec, pjob), out, batch_schema() if parquet else None, batch_status)
            else:
                counts = write_rows(prompts_rows(rec, pjob), out, prompts_schema() if parquet else None)
            pending = counts.get("pending", 0)
            if pending and not partial:
                out.unlink()
                raise Incomplete(f"{pending} of {sum(counts.values())} input lines have no result yet; nothing was "
                                 "written. Run the job to the end and export again, or pass --partial to export "
                                 "what is done (the others as \"pending\" rows)")
            if pending:
                log.warning("%d of %d lines are pending (exported as \"pending\" rows)", pending,
                            sum(counts.values()))
            return [(out, counts)]
    except RunDamage as exc:
        raise StateDamaged(f"{sd.root} is damaged: {exc.path} at byte {exc.offset}: {exc.problem}. Run `asyncraft "
                           "verify` for every damaged position; `asyncraft run --salvage` sets the damage aside and "
                           "redoes the lost tasks.") from None
    raise ConfigError(f"--format {fmt} is not available for a {job} job")


def refuse_unfinished_raft(rec: Recovery, partial: bool) -> None:
    """A RAFT dataset is exported whole, or as a partial one only when asked (``--partial``): the tasks still
    pending are counted as ``status`` counts them, per stage."""
    from asyncraft.views import work_left

    total, pending, stages = work_left(rec)
    if pending == 0:
        return
    if (rec.latest.get("totals") or {}).get("capped"):
        log.info("the run stopped at its record limit (--max-records); %s task(s) were not asked", pending)
        return
    if pending is None:
        what = "the job's size is not known (it stopped before its input was counted)"
    else:
        per_stage = ", ".join(f"{name} {s['pending']}" for name, s in stages.items() if s.get("pending"))
        what = f"{pending} of {total} tasks are pending" + (f" ({per_stage})" if per_stage else "")
    if not partial:
        raise Incomplete(f"{what}; nothing was written. Run the job to the end and export again, or pass --partial "
                         "to export the records that are done")
    log.warning("%s: exporting the records that are done", what)


def _status(row: dict[str, Any]) -> str:
    return str(row.get("status", "ok"))


def write_rows(rows: Iterator[dict[str, Any]], out: Path, schema: Any = None,
               status_of: Callable[[dict[str, Any]], str] = _status) -> dict[str, int]:
    """Write rows atomically to .jsonl or .parquet; returns counts by status."""
    counts: dict[str, int] = {}
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".parquet":
            if schema is None:
                raise ConfigError("this format has no Parquet layout; use .jsonl")
            _write_parquet(rows, tmp, counts, schema, status_of)
        elif out.suffix in (".jsonl", ".json", ""):
            with open(tmp, "wb") as fh:
                for row in rows:
                    status = status_of(row)
                    counts[status] = counts.get(status, 0) + 1
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
    return pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("sample", pa.int64()),
                      ("status", pa.string()), ("content", pa.string()), ("finish_reason", pa.string()),
                      ("model", pa.string()), ("usage", usage), ("tool_calls", pa.string()), ("choices", pa.string()),
                      ("embeddings", pa.list_(pa.list_(pa.float64()))), ("metadata", pa.string()),
                      ("error", pa.string())])


def batch_schema() -> Any:
    """The Batch output fields; ``response`` and ``error`` as JSON text (a body's shape varies by endpoint)."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("custom_id", pa.string()), ("response", pa.string()),
                      ("error", pa.string()), ("sample", pa.int64()), ("metadata", pa.string())])


def _write_parquet(rows: Iterator[dict[str, Any]], path: Path, counts: dict[str, int], schema: Any,
                   status_of: Callable[[dict[str, Any]], str]) -> None:
    """Columns come from ``schema``; values that are not of a column's type (errors, tool calls) go in as JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = schema.names
    as_json = {f.name for f in schema if pa.types.is_string(f.type)}
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(path, schema) as writer:
        for row in rows:
            status = status_of(row)
            counts[status] = counts.get(status, 0) + 1
            batch.append({k: (orjson.dumps(v).decode() if k in as_json and isinstance(v, dict | list) else v)
                          for k, v in ((n, row.get(n)) for n in names)})
            if len(batch) >= PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch.clear()
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


# -- the raft job's formats ------------------------------------------------------------------------


@dataclass
class RaftCorpus:
    """What a raft state dir holds: every chunk (sorted) and where each answered question's record is."""

    chunks: list[ChunkInfo]
    position: dict[str, int]  # chunk id -> index in chunks
    answers: list[tuple[int, int, str, readers.Location]]  # (chunk position, question index, answer id, location)
    failed: int
    orphans: int


def load_raft(rec: Recovery) -> RaftCorpus:
    """One pass over the records. Chunk texts are kept in memory (each once); answers only as
    locations, read back one at a time when the rows are written."""
    from asyncraft.jobs.raft import STAGE_ANSWERS, STAGE_QUESTIONS, ChunkInfo

    chunk_meta: dict[str, dict[str, Any]] = {}
    chunk_done: set[str] = set()
    answers: dict[str, tuple[str, int, readers.Location]] = {}
    failed: set[str] = set()
    for r, loc in readers.iter_records(rec.view):
        kind = r.get("k")
        if kind not in ("done", "fail"):
            continue
        stage, tid = r.get("stage"), r.get("id")
        if not isinstance(tid, str):
            continue
        if stage == STAGE_QUESTIONS and isinstance(r.get("text"), str):
            if tid not in chunk_done:
                chunk_meta[tid] = {k: r.get(k) for k in ("source", "doc", "seg", "part", "chunk_index", "text")}
                if kind == "done":
                    chunk_done.add(tid)
        elif stage == STAGE_ANSWERS:
            if kind == "fail":
                failed.add(tid)
            elif tid not in answers and isinstance(r.get("parent"), str):
                answers[tid] = (r["parent"], int(r.get("q") or 0), loc)
    chunks = []
    for cid, m in chunk_meta.items():
        if m.get("chunk_index") is not None:
            pos = (0, int(m["chunk_index"]))
        else:
            pos = (int(m.get("seg") or 0), int(m.get("part") or 0))
        chunks.append(ChunkInfo(cid, str(m.get("source") or ""), str(m.get("doc") or ""), pos, m["text"],
                                m.get("chunk_index")))
    chunks.sort(key=lambda c: (c.source, c.doc, c.position, c.id))
    # The semantic chunker learns a chunk's place in its document only here: its rank by position.
    rank: dict[tuple[str, str], int] = {}
    for i, c in enumerate(chunks):
        if c.chunk_index is None:
            n = rank.get((c.source, c.doc), 0)
            rank[(c.source, c.doc)] = n + 1
            chunks[i] = ChunkInfo(c.id, c.source, c.doc, c.position, c.text, n)
    position = {c.id: i for i, c in enumerate(chunks)}
    ordered = []
    orphans = 0
    for aid, (parent, q, loc) in answers.items():
        at = position.get(parent)
        if at is None:
            orphans += 1  # its question record is damaged or was set aside by --salvage
            continue
        ordered.append((at, q, aid, loc))
    ordered.sort(key=lambda a: (a[0], a[1], a[2]))
    return RaftCorpus(chunks, position, ordered, len(failed - answers.keys()), orphans)


def raft_records(corpus: RaftCorpus, meta: dict[str, Any],
                 keep: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """Assembled RAFT records in a fixed order (document, chunk, question), see ``jobs.raft.assemble``."""
    from asyncraft.jobs.raft import assemble

    fp = meta.get("fingerprint") or {}
    k, p, seed = int(fp.get("distractors", 3)), float(fp.get("p", 0.8)), int(fp.get("seed", 0))
    with readers.Reader() as reader:
        for at, _q, aid, loc in corpus.answers:
            if keep is not None and not keep(aid):
                continue
            r = reader.read(loc)
            answer = str((r.get("message") or {}).get("content") or "")
            yield assemble(aid, str(r.get("question") or ""), answer, corpus.chunks[at],
                           corpus.chunks, at, distractors=k, p=p, seed=seed)


def format_row(record: dict[str, Any], fmt: str, settings: Settings) -> dict[str, Any]:
    """One record in one of the layouts of raft.py's format converter."""
    from asyncraft.raft_prompts import final_answer

    if fmt == "raft":
        return record
    instruction, answer = record["instruction"], record["cot_answer"]
    if fmt == "chat":
        # OpenAI's chat fine-tuning format. No stop token: chat models end the turn themselves.
        messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        messages += [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
        return {"messages": messages}
    if fmt == "completion":
        return {settings.prompt_column: instruction, settings.completion_column: answer + settings.stop_token}
    question = record["question"]
    context = instruction[: len(instruction) - len(question)] if instruction.endswith(question) else instruction
    return {"id": record["id"], "question": question, "gold_final_answer": final_answer(answer),
            "context": context.rstrip("\n")}


def raft_schema(fmt: str, settings: Settings) -> Any:
    import pyarrow as pa

    s = pa.string()
    if fmt == "raft":
        context = pa.struct([("title", pa.list_(pa.list_(s))), ("sentences", pa.list_(pa.list_(s)))])
        return pa.schema([("id", s), ("type", s), ("question", s), ("context", context), ("oracle_context", s),
                          ("cot_answer", s), ("instruction", s), ("source", s), ("chunk_index", pa.int64()),
                          ("oracle_in_context", pa.bool_())])
    if fmt == "chat":
        return pa.schema([("messages", pa.list_(pa.struct([("role", s), ("content", s)])))])
    if fmt == "completion":
        if settings.prompt_column == settings.completion_column:
            raise ConfigError("--prompt-column and --completion-column must differ")
        return pa.schema([(settings.prompt_column, s), (settings.completion_column, s)])
    return pa.schema([("id", s), ("question", s), ("gold_final_answer", s), ("context", s)])


def split_assignment(ids: list[str], spec: str, seed: int) -> dict[str, str]:
    """record id -> split name for the records that leave the main file. Records are ranked by a
    hash of the id and the seed, and each split takes the next round(fraction * n) of them: the
    same records always land in the same split, whatever order they were generated in."""
    from asyncraft.config import parse_split

    parts = parse_split(spec)
    ranked = sorted(ids, key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
    out: dict[str, str] = {}
    at = 0
    for name, frac in parts:
        take = round(frac * len(ranked))
        for rid in ranked[at: at + take]:
            out[rid] = name
        at += take
    return out


def split_path(out: Path, name: str) -> Path:
    return out.with_name(f"{out.stem}.{name}{out.suffix}")


def export_raft(rec: Recovery, meta: dict[str, Any], fmt: str, out: Path, settings: Settings) -> Written:
    if out.suffix not in (".jsonl", ".json", ".parquet", ""):
        raise ConfigError(f"--out {out}: use a .jsonl or .parquet file name")
    if fmt == "completion" and settings.prompt_column == settings.completion_column:
        raise ConfigError("--prompt-column and --completion-column must differ")
    sd = rec.view.sd
    corpus = load_raft(rec)
    k = int((meta.get("fingerprint") or {}).get("distractors", 3))
    if corpus.answers and len(corpus.chunks) < k + 1:
        log.warning("the state dir holds %d chunk(s): records get %d distractor(s) instead of %d", len(corpus.chunks),
                    max(0, len(corpus.chunks) - 1), k)
    if corpus.failed:
        log.warning("%d question(s) have no usable answer and are left out (see %s)", corpus.failed,
                    sd.errors_path)
    if corpus.orphans:
        log.warning("%d answer(s) whose question record is missing are left out", corpus.orphans)
    schema = raft_schema(fmt, settings) if out.suffix == ".parquet" else None
    seed = int((meta.get("fingerprint") or {}).get("seed", 0))
    assignment = split_assignment([a[2] for a in corpus.answers], settings.split, seed) if settings.split else {}
    written: Written = []
    targets: list[tuple[str | None, Path]] = [(None, out)]
    if settings.split:
        from asyncraft.config import parse_split

        targets += [(name, split_path(out, name)) for name, _ in parse_split(settings.split)]
    for name, path in targets:
        def keep(rid: str, name: str | None = name) -> bool:
            return assignment.get(rid) == name

        rows = (format_row(r, fmt, settings) for r in raft_records(corpus, meta, keep if settings.split else None))
        written.append((path, write_rows(rows, path, schema)))
    return written
