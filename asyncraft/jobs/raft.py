"""The RAFT job: documents -> chunks -> questions per chunk -> one chain-of-thought answer per question.

Stages are tasks with content-hashed ids (``records.content_id`` over the stage, the prompt
version and the exact request body, which holds the chunk or question text, the model, the
templates, the number of questions and every extra body parameter):

- ``embed`` (``--chunker semantic`` only): one ``/v1/embeddings`` call per segment of a document;
  its done record holds the chunks cut from it, and its children are their question tasks.
- ``questions``: one call per chunk. The task's meta carries the chunk text and where it comes
  from; its done record holds the parsed questions, and its children are the answer tasks.
- ``answers``: one call per question; its done record holds the answer (``message.content``, with
  the final-answer tag written as ``<ANSWER>:``).

Because a done record holds everything its children are built from, recovery rebuilds the
children of finished parents from the journal (``wants``/``replay``/``recovered_children``) and
never pays for a call again; adding a document only creates tasks for that document's chunks.

Assembly happens at export, from the journal, not at answer time. A record's distractors are
drawn from every chunk the state dir knows, with a random generator seeded from the record id
and ``--seed``, and the oracle is kept with probability ``--p``. At answer time the corpus is
still being read (the feeder reads lazily and children run first), so assembling then would
depend on timing; at export the set of chunks and answers is a function of the journal alone, so
an export after any number of crashes equals the export of an uninterrupted run byte for byte,
and the journal stores each chunk once instead of once per record and distractor.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from asyncraft import chunking, documents
from asyncraft.config import Settings
from asyncraft.errors import ConfigError
from asyncraft.jobs.base import InputProblem, Outcome, Task
from asyncraft.provider import Completion
from asyncraft.raft_prompts import PROMPT_VERSION, Prompts, parse_answer, parse_questions, retry_note, with_note
from asyncraft.records import content_id, id_key

log = logging.getLogger("asyncraft")

STAGE_EMBED = "embed"
STAGE_QUESTIONS = "questions"
STAGE_ANSWERS = "answers"
RECORD_TYPE = "general"  # raft.py's type for documents that are not API docs


_D = Settings  # the defaults live in one place: the settings


@dataclass(frozen=True)
class RaftParams:
    """The settings that shape what the RAFT job generates."""

    model: str
    extra_body: dict[str, Any] = field(default_factory=dict)
    questions: int = _D.questions
    distractors: int = _D.distractors
    p: float = _D.p
    chunk_size: int = _D.chunk_size
    chunk_overlap: int = _D.chunk_overlap
    chunker: str = _D.chunker
    embedding_model: str = _D.embedding_model
    prompt_style: str = _D.prompt_style
    question_template: str | None = _D.question_template
    answer_template: str | None = _D.answer_template
    json_text_field: str = _D.json_text_field
    max_document_mb: float = _D.max_document_mb
    answer_retries: int = _D.answer_retries
    max_records: int = _D.max_records
    seed: int = _D.seed

    @classmethod
    def from_settings(cls, s: Settings) -> RaftParams:
        if not s.model:
            raise ConfigError("--model (ASYNCRAFT_MODEL) is required for the raft job")
        values = {f.name: getattr(s, f.name) for f in fields(cls)}
        values["extra_body"] = dict(s.extra_body)
        return cls(**values)


def _doc_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


class RaftJob:
    name = "raft"

    def __init__(self, input_path: str | Path, params: RaftParams) -> None:
        self.input_path = Path(input_path)
        self.params = params
        if params.chunk_overlap * 2 > params.chunk_size:
            raise ConfigError("ASYNCRAFT_CHUNK_OVERLAP must be at most half of ASYNCRAFT_CHUNK_SIZE")
        self.prompts = Prompts.build(params.prompt_style, params.question_template, params.answer_template)
        # Settled root tasks (done or failed), so a watch-mode rescan skips unchanged documents.
        self._settled: set[str] = set()
        self._files: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self._replayed_embeds: list[dict[str, Any]] = []
        self._replayed_questions: list[dict[str, Any]] = []
        self._records_before: set[int] = set()
        self.records_new = 0

    # -- protocol ----------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        fp: dict[str, Any] = {
            "job": self.name, "prompt_version": PROMPT_VERSION, "questions": p.questions, "chunker": p.chunker,
            "chunk_size": p.chunk_size, "chunk_overlap": p.chunk_overlap, "prompt_style": p.prompt_style,
            "prompts": self.prompts.digest, "json_text_field": p.json_text_field,
            "distractors": p.distractors, "p": p.p, "seed": p.seed,
        }
        if p.chunker == "semantic":
            fp["embedding_model"] = p.embedding_model
        return fp

    def roots(self) -> Iterator[Task | InputProblem]:
        """Scans the input afresh on every call (watch mode calls it again); a file whose size and
        mtime did not change and whose tasks are all settled is not read again."""
        docs = chunks = 0
        first_scan = not self._files
        for entry in documents.list_files(self.input_path):
            if isinstance(entry, documents.DocProblem):
                yield _problem(entry)
                continue
            sig = (entry.size, entry.mtime_ns)
            cached = self._files.get(entry.rel)
            if cached is not None and cached[0] == sig and all(t in self._settled for t in cached[1]):
                continue
            ids: list[str] = []
            for doc in documents.read_file(entry, text_field=self.params.json_text_field,
                                           max_bytes=int(self.params.max_document_mb * (1 << 20))):
                if isinstance(doc, documents.DocProblem):
                    yield _problem(doc)
                    continue
                docs += 1
                for task in self.document_tasks(doc):
                    ids.append(task.id)
                    if task.stage == STAGE_QUESTIONS:
                        chunks += 1
                    yield task
            self._files[entry.rel] = (sig, ids)
        if first_scan and not self._files and docs == 0:
            log.warning("no documents found in %s (supported: %s)", self.input_path,
                        " ".join(documents.SUFFIXES))
        if first_scan and self.params.chunker == "simple" and 0 < chunks < self.params.distractors + 1:
            log.warning("the input has only %d chunk(s): records will get fewer than %d distractors "
                        "(--distractors); add documents or lower --chunk-size", chunks, self.params.distractors)

    def wants(self, kind: str, stage: str) -> bool:
        return kind in ("done", "fail") and stage in (STAGE_EMBED, STAGE_QUESTIONS)

    def replay(self, record: dict[str, Any]) -> None:
        tid = record.get("id")
        if not isinstance(tid, str):
            return
        self._settled.add(tid)
        if record.get("k") != "done":
            return
        if record.get("stage") == STAGE_EMBED:
            self._replayed_embeds.append(record)
        elif record.get("stage") == STAGE_QUESTIONS:
            self._replayed_questions.append(record)

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        out: list[Task] = []
        for rec in self._replayed_embeds:
            for child in self._embed_children(rec, rec.get("chunks") or []):
                key = id_key(child.id)
                if key not in done and key not in failed:
                    out.append(child)
        for rec in self._replayed_questions:
            for child in self._answer_children(rec["id"], rec.get("text") or "", rec.get("questions") or []):
                key = id_key(child.id)
                if key in done:
                    self._records_before.add(key)
                elif key not in failed:
                    out.append(child)
        self._replayed_embeds.clear()
        self._replayed_questions.clear()
        return out

    def limit_reached(self) -> str | None:
        limit = self.params.max_records
        have = len(self._records_before) + self.records_new
        if limit and have >= limit:
            return (f"record limit reached: {have:,} records of ASYNCRAFT_MAX_RECORDS={limit:,}; raise it and run "
                    "the same command again to continue")
        return None

    def retry_task(self, task: Task, paid: int) -> Task:
        """The request for the attempt after ``paid`` rejected answers: the base request plus a note,
        so every attempt is a distinct request (and the note tells the model what went wrong)."""
        base = self._base_messages(task)
        if paid <= 0:
            messages = base
        elif task.stage == STAGE_QUESTIONS:
            messages = with_note(base, retry_note("questions", paid, self.params.questions), role="system")
        else:
            messages = with_note(base, retry_note("answers", paid), role="user")
        return Task(task.id, task.stage, {**task.body, "messages": messages}, task.meta, task.endpoint, paid)

    def handle(self, task: Task, completion: Completion) -> Outcome:
        if task.stage == STAGE_EMBED:
            return self._handle_embed(task, completion)
        if task.stage == STAGE_QUESTIONS:
            return self._handle_questions(task, completion)
        return self._handle_answer(task, completion)

    # -- tasks -------------------------------------------------------------------------------------

    def document_tasks(self, doc: documents.Document) -> Iterator[Task]:
        p = self.params
        dh = _doc_hash(doc.text)
        if p.chunker == "semantic":
            spans = chunking.sentences(doc.text, p.chunk_size)
            for seg, (a, b) in enumerate(chunking.segments(spans, p.chunk_size)):
                pieces = [doc.text[x:y] for x, y in spans[a:b]]
                yield self.embed_task(pieces, {"source": doc.source, "doc": dh, "seg": seg})
            return
        for i, chunk in enumerate(chunking.chunk_text(doc.text, p.chunk_size, p.chunk_overlap)):
            yield self.question_task(chunk.text, {"source": doc.source, "doc": dh, "chunk_index": i})

    def embed_task(self, pieces: list[str], meta: dict[str, Any]) -> Task:
        body = {"model": self.params.embedding_model, "input": pieces}
        return Task(content_id(STAGE_EMBED, PROMPT_VERSION, body), STAGE_EMBED, body, meta, endpoint="embed")

    def question_task(self, text: str, meta: dict[str, Any]) -> Task:
        body = {**self.params.extra_body, "model": self.params.model,
                "messages": self.prompts.question_messages(text, self.params.questions)}
        return Task(content_id(STAGE_QUESTIONS, PROMPT_VERSION, body), STAGE_QUESTIONS, body, {**meta, "text": text})

    def answer_task(self, parent: str, index: int, question: str, chunk: str) -> Task:
        body = {**self.params.extra_body, "model": self.params.model,
                "messages": self.prompts.answer_messages(question, chunk)}
        return Task(content_id(STAGE_ANSWERS, PROMPT_VERSION, body), STAGE_ANSWERS, body,
                    {"parent": parent, "q": index, "question": question})

    def _embed_children(self, rec: dict[str, Any], chunks: list[str]) -> list[Task]:
        meta = {"source": rec.get("source"), "doc": rec.get("doc"), "seg": rec.get("seg", 0)}
        return [self.question_task(text, {**meta, "part": j}) for j, text in enumerate(chunks)]

    def _answer_children(self, parent: str, chunk: str, questions: list[str]) -> list[Task]:
        return [self.answer_task(parent, i, q, chunk) for i, q in enumerate(questions)]

    def _base_messages(self, task: Task) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = task.body["messages"]
        if task.attempt <= 0:
            return messages
        if task.stage == STAGE_QUESTIONS:
            note, role = retry_note("questions", task.attempt, self.params.questions), "system"
        else:
            note, role = retry_note("answers", task.attempt), "user"
        out = [dict(m) for m in messages]
        for m in reversed(out):
            if m.get("role") == role:
                content = str(m.get("content", ""))
                if content.endswith(note):
                    m["content"] = content[: -len(note)]
                break
        return out

    # -- answers -----------------------------------------------------------------------------------

    def _reject(self, task: Task, why: str, completion: Completion) -> Outcome:
        """A paid answer that cannot be used: ask again (bounded), then set it aside as failed."""
        if task.attempt < self.params.answer_retries:
            return Outcome(retry=self.retry_task(task, task.attempt + 1), retry_reason=why)
        self._settled.add(task.id)
        return Outcome(fail=f"{why} (after {task.attempt + 1} attempt(s); the raw text is in the journal)")

    def _handle_embed(self, task: Task, completion: Completion) -> Outcome:
        vectors = completion.message.get("embeddings")
        pieces: list[str] = task.body["input"]
        if not isinstance(vectors, list) or len(vectors) != len(pieces):
            got = len(vectors) if isinstance(vectors, list) else 0
            return Outcome(fail=f"the embeddings response has {got} vectors for {len(pieces)} sentences")
        groups = chunking.semantic_groups([len(x) for x in pieces], vectors, self.params.chunk_size)
        chunks = [text for text in ("".join(pieces[a:b]).strip() for a, b in groups) if text]
        self._settled.add(task.id)
        rec = {**task.meta, "id": task.id}
        return Outcome(result={"chunks": chunks}, children=self._embed_children(rec, chunks))

    def _handle_questions(self, task: Task, completion: Completion) -> Outcome:
        questions, dropped = parse_questions(completion.message.get("content"), self.params.questions)
        if completion.finish_reason == "length" and len(questions) > 1:
            questions.pop()  # cut off by max_tokens: the last line may be half a question
            dropped += 1
        if not questions:
            return self._reject(task, "no questions in the answer", completion)
        self._settled.add(task.id)
        # "message" is what `asyncraft tail` shows; the children are built from "questions".
        result: dict[str, Any] = {"questions": questions, "message": {"content": "\n".join(questions)}}
        if dropped:
            result["dropped"] = dropped
        return Outcome(result=result, children=self._answer_children(task.id, task.meta["text"], questions))

    def _handle_answer(self, task: Task, completion: Completion) -> Outcome:
        if completion.finish_reason == "length":
            return self._reject(task, "answer cut off by max_tokens", completion)
        cot, why = parse_answer(completion.message.get("content"))
        if cot is None:
            return self._reject(task, why, completion)
        self.records_new += 1
        return Outcome(result={"message": {"content": cot}})


def _problem(p: documents.DocProblem) -> InputProblem:
    return InputProblem(f"doc:{p.source}", p.message, {"path": p.source})


# -- assembly (at export) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    id: str
    source: str
    doc: str
    position: tuple[int, int]  # (segment, index) for sorting; (0, chunk index) for the simple chunker
    text: str
    chunk_index: int | None  # known for the simple chunker; the semantic one is ranked at export


def assemble(record_id: str, question: str, cot_answer: str, oracle: ChunkInfo, corpus: list[ChunkInfo],
             oracle_pos: int, *, distractors: int, p: float, seed: int) -> dict[str, Any]:
    """One RAFT record (the fields of Gorilla's raft.py, plus source and chunk index).

    ``k`` distractors are sampled from the other chunks, and with probability ``1 - p`` the oracle
    is replaced by one more distractor; the generator is seeded from the record id and ``seed``
    only, so the same record always gets the same context. raft.py may repeat a distractor when it
    drops the oracle; here all documents of a context are distinct. A corpus of fewer than k+1
    chunks gives fewer distractors."""
    rng = random.Random(int(content_id("assemble", record_id, seed), 16))
    others = len(corpus) - 1
    picks = [corpus[i + 1 if i >= oracle_pos else i] for i in rng.sample(range(others), min(distractors + 1, others))]
    keep = rng.random() < p
    docs = [oracle, *picks[:distractors]] if keep else picks[: distractors + 1]
    rng.shuffle(docs)
    instruction = "".join(f"<DOCUMENT>{d.text}</DOCUMENT>\n" for d in docs) + question
    return {
        "id": record_id, "type": RECORD_TYPE, "question": question,
        "context": {"title": [[d.source for d in docs]], "sentences": [[d.text for d in docs]]},
        "oracle_context": oracle.text, "cot_answer": cot_answer, "instruction": instruction,
        "source": oracle.source, "chunk_index": oracle.chunk_index, "oracle_in_context": keep,
    }
