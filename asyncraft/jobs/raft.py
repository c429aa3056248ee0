"""The RAFT job: documents -> chunks -> questions per chunk -> one chain-of-thought answer per question.

Stages are tasks with content-hashed ids (``records.content_id`` over the stage, the prompt
version and the exact request body, which holds the chunk or question text, the model, the
templates, the number of questions, max_tokens, the response format and every extra body parameter):

- ``embed`` (``--chunker semantic`` only): one ``/v1/embeddings`` call per segment of a document;
  its done record holds the chunks cut from it, and its children are their question tasks.
- ``questions``: one call per chunk. The task's meta carries the chunk text and where it comes
  from; its done record holds the parsed questions, and its children are the answer tasks.
- ``answers``: one call per question; its done record holds the answer (``message.content``, with
  the final-answer tag written as ``<ANSWER>:``).

Because a done record holds everything its children are built from, recovery rebuilds the
children of finished parents from the journal (``wants``/``replay``/``recovered_children``) and
never pays for a call again; adding a document only creates tasks for that document's chunks.

Every chat request carries a ``max_tokens`` sized to its stage, and asks, where the server offers
it, for constrained output (``structured``): a JSON object whose fields the job checks and turns
into the same RAFT text as the free-text ("tagged") prompts. The form a server takes is learned
during the run (a refusal of ``response_format`` is an error answer the scheduler shows
``call_failed``; a reply that is not JSON shows a server that ignores it); tasks queued before are
made again in that form just before their call (``refresh``). The form is kept in the meta of
every chat task, so a resumed run replays it from the question records and asks in that form
from the start. Every reply is judged; when most of the first replies of a run are rejected, or the
server returns empty replies, ``limit_reached`` stops the run with what the model returned.

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
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from asyncraft import chunking, documents, structured, validate
from asyncraft.config import Settings
from asyncraft.errors import ConfigError, ProviderError
from asyncraft.jobs.base import InputProblem, Outcome, Task
from asyncraft.provider import Completion
from asyncraft.raft_prompts import (
    PROMPT_VERSION,
    Prompts,
    parse_answer,
    retry_note,
    select_questions,
    structured_note,
    with_note,
    without_note,
)
from asyncraft.records import content_id, id_key
from asyncraft.structured import FORMS, JSON_OBJECT, JSON_SCHEMA, TAGGED

log = logging.getLogger("asyncraft")

STAGE_EMBED = "embed"
STAGE_QUESTIONS = "questions"
STAGE_ANSWERS = "answers"
RECORD_TYPE = "general"  # raft.py's type for documents that are not API docs

# The early quality stop judges this many replies at the start of each run.
QUALITY_WINDOW = 20
# Empty replies with zero completion tokens, before any reply with text, that stop the run.
EMPTY_STOP = 3
# An attempt record with this reason tells a resumed run that the server ignores response_format.
IGNORED = "the server ignored response_format (the reply is not JSON); asked again with free-text prompts"
_NOTE_ROLE = {STAGE_QUESTIONS: "system", STAGE_ANSWERS: "user"}
_FORM_ORDER = (JSON_SCHEMA, JSON_OBJECT, TAGGED)  # what auto tries, in order

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
    structured: str = _D.structured
    question_tokens: int = _D.question_tokens
    answer_tokens: int = _D.answer_tokens
    quality_stop: float = _D.quality_stop
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
        if "response_format" in params.extra_body and params.structured != "off":
            raise ConfigError("ASYNCRAFT_EXTRA_BODY sets response_format, which the raft job sets itself: remove it, "
                              "or pass --structured off to send yours with the free-text prompts")
        self.prompts = Prompts.build(params.prompt_style, params.question_template, params.answer_template)
        # The form chat requests are made in now: learned during the run and from replayed records.
        self.form = TAGGED if params.structured == "off" else JSON_SCHEMA
        # A max_tokens of the user's wins, and is never raised on a retry.
        self._user_bound = next((k for k in ("max_tokens", "max_completion_tokens") if k in params.extra_body), None)
        # Settled root tasks (done or failed), so a watch-mode rescan skips unchanged documents.
        self._settled: set[str] = set()
        self._files: dict[str, tuple[tuple[int, int], list[str]]] = {}
        self._replayed_embeds: list[dict[str, Any]] = []
        self._replayed_questions: list[dict[str, Any]] = []
        self._records_before: set[int] = set()
        self.records_new = 0
        # The judgement of this run's first replies of each chat stage (the early quality stop).
        self._judged: Counter[str] = Counter()
        self._rejected: dict[str, Counter[str]] = {STAGE_QUESTIONS: Counter(), STAGE_ANSWERS: Counter()}
        self._examples: dict[str, str] = {}  # a reply for each reason
        self._empty_zero = 0
        self._had_text = False
        self._stop: str | None = None
        self._pooled_noted = False
        self.at_record_limit = False  # the run holds the --max-records asked for: a dataset as asked, not partial
        # The size of the job, per stage: what the count at start planned, and what settled since (all runs).
        self._plan: tuple[int, int] | None = None  # (embedding calls, chunks) in the input
        self._stage_done: Counter[str] = Counter()
        self._stage_failed: Counter[str] = Counter()
        self._noted: set[str] = set()  # embedding and question tasks already counted
        self._chunks_made = 0  # by the settled embedding calls
        self._questions_made = 0  # by the settled question calls

    # -- protocol ----------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        p = self.params
        fp: dict[str, Any] = {
            "job": self.name, "prompt_version": PROMPT_VERSION, "questions": p.questions, "chunker": p.chunker,
            "chunk_size": p.chunk_size, "chunk_overlap": p.chunk_overlap, "prompt_style": p.prompt_style,
            "prompts": self.prompts.digest, "json_text_field": p.json_text_field,
            "distractors": p.distractors, "p": p.p, "seed": p.seed, "structured": p.structured,
            "question_tokens": p.question_tokens, "answer_tokens": p.answer_tokens,
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

    # -- the size of the job ---------------------------------------------------------------------------

    def count_input(self, stop: threading.Event) -> None:
        """Read and chunk every document once at start (the scheduler runs this on a thread), so that the
        progress shows totals per stage from the start although the feeder reads documents lazily. The
        semantic chunker's chunks are known only from its embeddings: estimated from the text's length. A run
        that ends first sets ``stop``: the count ends at the next file, unfinished."""
        p = self.params
        embeds = chunks = 0
        for entry in documents.list_files(self.input_path):
            if stop.is_set():
                return
            if isinstance(entry, documents.DocProblem):
                continue
            for doc in documents.read_file(entry, text_field=p.json_text_field,
                                           max_bytes=int(p.max_document_mb * (1 << 20))):
                if isinstance(doc, documents.DocProblem):
                    continue
                if p.chunker == "semantic":
                    embeds += len(chunking.segments(chunking.sentences(doc.text, p.chunk_size), p.chunk_size))
                    chunks += -(-chunking.estimate_tokens(doc.text) // p.chunk_size)
                else:
                    chunks += len(chunking.chunk_text(doc.text, p.chunk_size, p.chunk_overlap))
        self._plan = (embeds, chunks)

    def totals(self, read: int | None) -> dict[str, dict[str, int]] | None:
        """Tasks per stage (done, failed and pending) in all runs: embedding calls and chunks from the count at
        start (the chunks of finished embedding calls exactly), one answer call per question of the finished
        question calls and ``--questions`` per chunk still to ask. A stage's total never falls below what
        settled in it, and nothing shows as finished while a chunk still waits for its questions."""
        if self._plan is None:
            return None
        embeds, planned = self._plan
        done, failed = self._stage_done, self._stage_failed

        def stage(name: str, total: int) -> dict[str, int]:
            return {"total": max(total, done[name] + failed[name]), "done": done[name], "failed": failed[name]}

        out: dict[str, dict[str, int]] = {}
        chunks = planned
        if self.params.chunker == "semantic":
            out[STAGE_EMBED] = stage(STAGE_EMBED, embeds)
            left = max(embeds - done[STAGE_EMBED] - failed[STAGE_EMBED], 0)
            chunks = self._chunks_made + (-(-left * planned // embeds) if embeds else 0)
        out[STAGE_QUESTIONS] = stage(STAGE_QUESTIONS, chunks)
        asked = done[STAGE_QUESTIONS] + failed[STAGE_QUESTIONS]
        unasked = max(out[STAGE_QUESTIONS]["total"] - asked, 0)
        out[STAGE_ANSWERS] = stage(STAGE_ANSWERS, self._questions_made + unasked * self.params.questions)
        return out

    def on_commit(self, batch: list[dict[str, Any]]) -> None:
        """The journal's commit hook: settled tasks of this run, for the totals."""
        for rec in batch:
            self._note(rec)

    def _note(self, rec: dict[str, Any]) -> None:
        kind, stage, tid = rec.get("k"), rec.get("stage"), rec.get("id")
        if kind not in ("done", "fail") or not isinstance(stage, str) or not isinstance(tid, str):
            return
        if stage != STAGE_ANSWERS:
            if tid in self._noted:
                return
            self._noted.add(tid)
        (self._stage_done if kind == "done" else self._stage_failed)[stage] += 1
        if kind == "done" and stage == STAGE_EMBED:
            self._chunks_made += len(rec.get("chunks") or [])
        elif kind == "done" and stage == STAGE_QUESTIONS:
            self._questions_made += len(rec.get("questions") or [])

    def problem_key(self, task: Task) -> str | None:
        """The key its document's problem had, if it had one (``_problem``)."""
        source = task.meta.get("source")
        return f"doc:{source}" if task.stage != STAGE_ANSWERS and isinstance(source, str) else None

    # -- protocol, continued ---------------------------------------------------------------------------

    def wants(self, kind: str, stage: str) -> bool:
        if kind == "attempt":
            return stage in (STAGE_QUESTIONS, STAGE_ANSWERS)  # to see a server that ignores response_format
        return kind in ("done", "fail") and stage in (STAGE_EMBED, STAGE_QUESTIONS)

    def replay(self, record: dict[str, Any]) -> None:
        tid = record.get("id")
        if not isinstance(tid, str):
            return
        kind, stage = record.get("k"), record.get("stage")
        if kind == "attempt":
            if record.get("why") == IGNORED:
                self._learn(TAGGED)
            return
        self._settled.add(tid)
        self._note(record)
        if kind != "done":
            return
        if stage == STAGE_EMBED:
            self._replayed_embeds.append(record)
        elif stage == STAGE_QUESTIONS:
            form = record.get("form")
            if isinstance(form, str):
                self._learn(form, latest=True)
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
                    self._stage_done[STAGE_ANSWERS] += 1
                elif key in failed:
                    self._stage_failed[STAGE_ANSWERS] += 1
                else:
                    out.append(child)
        self._replayed_embeds.clear()
        self._replayed_questions.clear()
        return out

    def limit_reached(self) -> str | None:
        """Why the run must stop now: the record limit, replies the job cannot use, or a server
        that cannot do what was asked. Checked by the scheduler after every record."""
        if self._stop is not None:
            return self._stop
        limit = self.params.max_records
        have = len(self._records_before) + self.records_new
        if limit and have >= limit:
            self.at_record_limit = True
            return (f"record limit reached: {have:,} records of ASYNCRAFT_MAX_RECORDS={limit:,}; raise it and run "
                    "the same command again to continue")
        for stage, rejected in self._rejected.items():
            if rejected.total() > self.params.quality_stop * QUALITY_WINDOW:
                self._stop = self._quality_message(stage)
                return self._stop
        return None

    def retry_task(self, task: Task, paid: int) -> Task:
        """The request for the attempt after ``paid`` rejected replies: the first request plus a note
        and more room, so every attempt is a distinct request (and the note tells the model what
        went wrong)."""
        if task.stage == STAGE_EMBED:
            return Task(task.id, task.stage, task.body, task.meta, task.endpoint, paid, task.private)
        return self._make(task.stage, self._first_messages(task), task.meta, task.meta.get("form", TAGGED), paid,
                          task.private, task_id=task.id)

    def call_failed(self, task: Task, exc: ProviderError) -> Task | None:
        """The scheduler shows the job every error answer before deciding what to do with it.

        A request for constrained output that the server refuses is answered with the same request
        in the next form (``json_schema``, then ``json_object``, then free text with ``--structured
        auto``): the scheduler queues that one instead, and the run goes on in that form. A server
        that cannot do what the run needs (embeddings, or constrained output with ``--structured on``)
        stops the run (``limit_reached``) instead of failing or retrying every task. Otherwise None:
        the scheduler retries or fails the task as usual."""
        if task.stage == STAGE_EMBED:
            if exc.status not in (None, 429) and "embedding" in structured.server_said(exc).lower():
                self._stop = (f"the server does not serve embeddings ({exc}); --chunker semantic needs one that "
                              "does (llama.cpp: start it with --embedding true) or use --chunker simple")
            return None
        form = task.meta.get("form")
        if form not in FORMS or not structured.is_refusal(exc):
            return None
        nxt = _FORM_ORDER[_FORM_ORDER.index(form) + 1]
        if nxt == TAGGED and self.params.structured != "auto":
            self._stop = (f"the server refuses constrained output (response_format) in both forms: {exc}. "
                          "Run with --structured auto (falls back to free-text prompts) or --structured off")
            return None
        if _FORM_ORDER.index(nxt) > _FORM_ORDER.index(self.form):
            log.warning("the server refuses response_format of type %s (%s); asking with %s from now on", form,
                        " ".join(str(exc).split())[:300], "free-text prompts" if nxt == TAGGED else f"type {nxt}")
        self._learn(nxt)
        return self._make(task.stage, self._first_messages(task), task.meta, self.form, 0, task.private)

    def refresh(self, task: Task) -> Task:
        """The scheduler's look before a call: a chat task made before the run learned the form the
        server takes (it was queued) is made again in that form, so no request in a form the server
        refuses or ignores is sent once the run knows."""
        form = task.meta.get("form")
        if form is None or form == self.form:
            return task
        return self._make(task.stage, self._first_messages(task), task.meta, self.form, 0, task.private)

    def handle(self, task: Task, completion: Completion) -> Outcome:
        if task.stage == STAGE_EMBED:
            return self._handle_embed(task, completion)
        text = validate.chat_text(completion.message)
        if text is None:
            if (completion.usage or {}).get("completion_tokens") == 0 and not self._had_text:
                self._empty_zero += 1
                if self._empty_zero >= EMPTY_STOP:
                    self._stop = (
                        f"the server returned {self._empty_zero} empty replies with 0 completion tokens: that is a "
                        "server configuration problem, most often a model without a chat template (base models "
                        "often have none). Give the server one (llama.cpp: --chat_format, e.g. chatml; vLLM: "
                        "--chat-template) or use an instruct model")
            return self._reject(task, "empty reply (no text)", completion)
        self._had_text = True
        if task.stage == STAGE_QUESTIONS:
            return self._handle_questions(task, completion, text)
        return self._handle_answer(task, completion, text)

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
        messages = self.prompts.question_messages(text, self.params.questions)
        return self._make(STAGE_QUESTIONS, messages, {**meta, "text": text}, self.form)

    def answer_task(self, parent: str, index: int, question: str, chunk: str) -> Task:
        messages = self.prompts.answer_messages(question, chunk)
        return self._make(STAGE_ANSWERS, messages, {"parent": parent, "q": index, "question": question}, self.form,
                          private=chunk)

    def _make(self, stage: str, messages: list[dict[str, Any]], meta: dict[str, Any], form: str, attempt: int = 0,
              private: Any = None, *, task_id: str | None = None) -> Task:
        """A chat task from its free-text messages: in ``form``, for ``attempt``. Its id is that of
        attempt 0 (every attempt is the same task); a task in another form is another task."""
        first = self._body(stage, messages, form, 0, private)
        if task_id is None:
            task_id = content_id(stage, PROMPT_VERSION, first)
        body = first if attempt == 0 else self._body(stage, messages, form, attempt, private)
        return Task(task_id, stage, body, {**meta, "form": form}, "chat", attempt, private)

    def _body(self, stage: str, messages: list[dict[str, Any]], form: str, attempt: int, chunk: Any) -> dict[str, Any]:
        role = _NOTE_ROLE[stage]
        n = self.params.questions
        if form in FORMS:
            messages = with_note(messages, structured_note(stage, n), role=role)
        if attempt > 0:
            messages = with_note(messages, retry_note(stage, attempt, n, structured=form in FORMS), role=role)
        body: dict[str, Any] = {**self.params.extra_body, "model": self.params.model, "messages": messages}
        if self._user_bound is None:
            body["max_tokens"] = self._bound(stage) * (2 if attempt > 0 else 1)
        if form in FORMS:
            if stage == STAGE_QUESTIONS:
                schema = structured.questions_schema(n)
            else:
                # llama.cpp builds a grammar for every request anyway, so there the quotes can be held to
                # the chunk's sentences. OpenAI (the other dialect) processes every new schema at length
                # before answering and caches it: one schema for the whole run.
                quotable = chunk if form == JSON_OBJECT and isinstance(chunk, str) else ""
                schema = structured.answer_schema(self._sentences(quotable))
            body["response_format"] = structured.response_format(form, stage, schema)
        return body

    def _sentences(self, chunk: str) -> list[str]:
        """The chunk's sentences, each once: what a structured answer may quote."""
        out = (chunk[a:b].strip() for a, b in chunking.sentences(chunk, self.params.chunk_size))
        return list(dict.fromkeys(x for x in out if x))

    def _bound(self, stage: str) -> int:
        if stage == STAGE_QUESTIONS:
            return self.params.question_tokens * self.params.questions
        return self.params.answer_tokens

    def _first_messages(self, task: Task) -> list[dict[str, Any]]:
        """The free-text messages a chat task was made from (``_body`` undone)."""
        role = _NOTE_ROLE[task.stage]
        form = task.meta.get("form", TAGGED)
        messages: list[dict[str, Any]] = task.body["messages"]
        if task.attempt > 0:
            messages = without_note(messages, retry_note(task.stage, task.attempt, self.params.questions,
                                                         structured=form in FORMS), role=role)
        if form in FORMS:
            messages = without_note(messages, structured_note(task.stage, self.params.questions), role=role)
        return messages

    def _learn(self, form: str, *, latest: bool = False) -> None:
        """Go on in ``form``: one further down the list of forms the mode allows (or, for a form
        replayed from the journal, the latest one seen)."""
        mode = self.params.structured
        if form not in _FORM_ORDER or mode == "off" or (mode == "on" and form == TAGGED):
            return
        if latest or _FORM_ORDER.index(form) > _FORM_ORDER.index(self.form):
            self.form = form

    def _embed_children(self, rec: dict[str, Any], chunks: list[str]) -> list[Task]:
        meta = {"source": rec.get("source"), "doc": rec.get("doc"), "seg": rec.get("seg", 0)}
        return [self.question_task(text, {**meta, "part": j}) for j, text in enumerate(chunks)]

    def _answer_children(self, parent: str, chunk: str, questions: list[str]) -> list[Task]:
        return [self.answer_task(parent, i, q, chunk) for i, q in enumerate(questions)]

    # -- replies -----------------------------------------------------------------------------------

    def _reject(self, task: Task, why: str, completion: Completion, *, cut: bool = False) -> Outcome:
        """A paid reply that cannot be used: ask again (bounded; a reply cut off by max_tokens once,
        with twice the room), then set the task aside as failed. The record keeps the raw reply."""
        if task.stage != STAGE_EMBED and self._judged[task.stage] < QUALITY_WINDOW:
            self._judged[task.stage] += 1
            self._rejected[task.stage][why] += 1
            self._examples.setdefault(why, validate.chat_text(completion.message) or "")
        attempts = task.attempt + 1
        if cut and (task.attempt > 0 or self._user_bound is not None):
            self._settled.add(task.id)
            bound = task.body.get(self._user_bound or "max_tokens")
            return Outcome(fail=f"{why} (after {attempts} attempt(s), the last with max_tokens={bound})")
        if task.attempt < self.params.answer_retries:
            return Outcome(retry=self.retry_task(task, attempts), retry_reason=why)
        self._settled.add(task.id)
        return Outcome(fail=f"{why} (after {attempts} attempt(s))")

    def _accept(self, stage: str) -> None:
        if self._judged[stage] < QUALITY_WINDOW:
            self._judged[stage] += 1

    def _not_json(self, task: Task, completion: Completion, text: str) -> Outcome:
        """A reply to a structured request that holds no JSON object."""
        if completion.finish_reason == "length":
            return self._reject(task, "reply cut off by max_tokens", completion, cut=True)
        if structured.looks_like_json(text):
            return self._reject(task, "reply is not valid JSON", completion)
        if self.params.structured != "auto":
            return self._reject(task, "reply is not JSON (does the server ignore response_format? try --structured "
                                      "off)", completion)
        # A server that enforces the schema never answers free text: this one ignores the parameter.
        if self.form != TAGGED:
            log.warning("the server ignores response_format (a reply is not JSON); asking with free-text prompts "
                        "from now on")
        self._learn(TAGGED)
        return Outcome(retry=self._make(task.stage, self._first_messages(task), task.meta, TAGGED, 0, task.private),
                       retry_reason=IGNORED)

    def _handle_embed(self, task: Task, completion: Completion) -> Outcome:
        pieces: list[str] = task.body["input"]
        raw = completion.message.get("embeddings")
        try:
            vectors, pooled = validate.embedding_vectors(raw, len(pieces))
        except validate.Malformed as exc:
            # The scheduler journals this reply with the attempt or the failure: its shape tells
            # what went wrong, its thousands of numbers would not.
            completion.message = {"embeddings": validate.describe(raw)}
            return self._reject(task, f"malformed embeddings response: {exc}", completion)
        if pooled and not self._pooled_noted:
            self._pooled_noted = True
            log.info("the embeddings server returns one vector per token (no pooling); the job mean-pools them")
        groups = chunking.semantic_groups([len(x) for x in pieces], vectors, self.params.chunk_size)
        chunks = [text for text in ("".join(pieces[a:b]).strip() for a, b in groups) if text]
        self._settled.add(task.id)
        rec = {**task.meta, "id": task.id}
        return Outcome(result={"chunks": chunks}, children=self._embed_children(rec, chunks))

    def _handle_questions(self, task: Task, completion: Completion, text: str) -> Outcome:
        chunk: str = task.meta["text"]
        cut = completion.finish_reason == "length"
        candidates: list[str] | None
        if task.meta.get("form", TAGGED) in FORMS:
            candidates = structured.questions_from(text)  # complete strings only, when cut off
            if candidates is None:
                return self._not_json(task, completion, text)
        else:
            candidates = text.splitlines()
            if cut and candidates:
                candidates.pop()  # cut off by max_tokens: the last line may be half a question
        # A copy of the chunk or of the prompt (its example questions) is no question of the model's.
        prompt = "\n".join(str(m.get("content", "")) for m in task.body["messages"] if m.get("role") != "user")
        questions, dropped = select_questions(candidates, self.params.questions, f"{chunk}\n{prompt}")
        if not questions:
            why = "no questions in the reply" + (" (cut off by max_tokens)" if cut else "")
            return self._reject(task, why, completion, cut=cut)
        self._accept(task.stage)
        self._settled.add(task.id)
        # "message" is what `asyncraft tail` shows; the children are built from "questions".
        result: dict[str, Any] = {"questions": questions, "message": {"content": "\n".join(questions)}}
        if dropped:
            result["dropped"] = dict(dropped)
        return Outcome(result=result, children=self._answer_children(task.id, chunk, questions))

    def _handle_answer(self, task: Task, completion: Completion, text: str) -> Outcome:
        if completion.finish_reason == "length":
            return self._reject(task, "answer cut off by max_tokens", completion, cut=True)
        if self.prompts.repeats_instructions(text):
            return self._reject(task, "the reply repeats the prompt's instructions", completion)
        if task.meta.get("form", TAGGED) in FORMS:
            obj = structured.load_object(text)
            if obj is None:
                return self._not_json(task, completion, text)
            cot, why = structured.assemble_answer(obj, task.private if isinstance(task.private, str) else "")
        else:
            cot, why = parse_answer(text)
        if cot is None:
            return self._reject(task, why, completion)
        self._accept(task.stage)
        self.records_new += 1
        return Outcome(result={"message": {"content": cot}})

    def _quality_message(self, stage: str) -> str:
        rejected = self._rejected[stage]
        why, _ = rejected.most_common(1)[0]
        example = " ".join(self._examples.get(why, "").split())
        example = (example[:200] + "...") if len(example) > 200 else example
        reasons = "; ".join(f"{k}: {v}" for k, v in rejected.most_common())
        replies = "answers" if stage == STAGE_ANSWERS else "question replies"
        hints = ["an instruct (chat) model"]
        if self.form == TAGGED:
            if self.params.structured == "off":
                hints.append("--structured on (constrained output, where the server offers it)")
            hints.append("--prompt-style " + ("llama" if self.params.prompt_style == "gpt" else "gpt"))
        else:
            hints.append("--structured off")
        return (f"quality stop: {rejected.total()} of the first {self._judged[stage]} {replies} were rejected "
                f"({reasons}); the model returned, for example: {example!r}. Try {', '.join(hints)}, or "
                "--quality-stop 1 to go on anyway")


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
