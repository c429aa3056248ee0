"""The RAFT job's pure parts: document loading, chunking, prompts, parsing, tasks and assembly."""

from __future__ import annotations

import random
import re
from pathlib import Path

import orjson
import pytest

from asyncraft import chunking, documents
from asyncraft.config import load, parse_split
from asyncraft.errors import ConfigError
from asyncraft.export import split_assignment
from asyncraft.jobs.base import InputProblem, Task
from asyncraft.jobs.raft import STAGE_ANSWERS, STAGE_QUESTIONS, ChunkInfo, RaftJob, RaftParams, assemble
from asyncraft.provider import Completion
from asyncraft.raft_prompts import Prompts, clean_question, final_answer, parse_answer, parse_questions


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF (one Helvetica text line per page), with a correct xref table."""
    objs: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({esc}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font_id} 0 R "
                    f">> >> /Contents {4 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def read_all(root: Path, **kw: object) -> list[documents.Document | documents.DocProblem]:
    out: list[documents.Document | documents.DocProblem] = []
    for entry in documents.list_files(root):
        if isinstance(entry, documents.DocProblem):
            out.append(entry)
        else:
            out.extend(documents.read_file(entry, **kw))  # type: ignore[arg-type]
    return out


# -- documents -------------------------------------------------------------------------------------


def test_each_input_type_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Plain text document.", encoding="utf-8")
    (tmp_path / "b.md").write_bytes(b"\xef\xbb\xbf# Markdown\n\nWith a BOM.")
    (tmp_path / "c.pdf").write_bytes(make_pdf(["The keeper climbed the lighthouse", "keeper stairs at dusk."]))
    (tmp_path / "d.json").write_bytes(orjson.dumps({"body": "A JSON document.", "title": "x"}))
    (tmp_path / "e.json").write_bytes(orjson.dumps([{"body": "First."}, {"body": "Second."}]))
    (tmp_path / "f.jsonl").write_bytes(b'{"body": "Line one."}\n\n{"body": "Line three."}\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "g.txt").write_text("Nested.", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "u16.txt").write_bytes("UTF-16 text.".encode("utf-16"))
    docs = read_all(tmp_path, text_field="body")
    assert all(isinstance(d, documents.Document) for d in docs), docs
    got = {d.source: d.text for d in docs}
    assert list(got) == ["a.txt", "b.md", "c.pdf", "d.json", "e.json[0]", "e.json[1]", "f.jsonl:1", "f.jsonl:3",
                         "sub/g.txt", "u16.txt"]
    assert got["b.md"] == "# Markdown\n\nWith a BOM."
    # Pages are joined so that the last word of a page and the first of the next stay apart.
    assert "lighthouse\n\nkeeper" in got["c.pdf"] and "lighthousekeeper" not in got["c.pdf"]
    assert got["e.json[1]"] == "Second." and got["f.jsonl:3"] == "Line three." and got["u16.txt"] == "UTF-16 text."


def test_bad_documents_become_problems_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("   \n\n", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"abc \x80\x81\xfe text")
    (tmp_path / "nul.md").write_bytes(b"abc\x00def")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all")
    (tmp_path / "blank.pdf").write_bytes(make_pdf([""]))
    (tmp_path / "big.txt").write_text("word " * 1000, encoding="utf-8")
    (tmp_path / "gone.md").symlink_to(tmp_path / "nowhere.md")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "nofield.json").write_bytes(orjson.dumps({"content": "x"}))
    (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "good one"}\n{broken\n{"other": 1}\n{"text": ""}\n')
    docs = read_all(tmp_path, max_bytes=2000)
    problems = {d.source: d.message for d in docs if isinstance(d, documents.DocProblem)}
    good = [d.source for d in docs if isinstance(d, documents.Document)]
    assert good == ["mixed.jsonl:1"]
    expected = {"bad.json": "not valid JSON", "big.txt": "over the limit", "binary.txt": "not valid UTF-8",
                "blank.pdf": "no extractable text", "broken.pdf": "not a readable PDF", "empty.txt": "empty document",
                "gone.md": "cannot read", "mixed.jsonl:2": "not valid JSON", "mixed.jsonl:3": "no string field 'text'",
                "mixed.jsonl:4": "empty document", "nofield.json": "no string field 'text'", "nul.md": "NUL"}
    assert set(problems) == set(expected)
    for src, fragment in expected.items():
        assert problems[src].startswith(src) and fragment in problems[src], (src, problems[src])


def test_a_single_file_is_its_own_root(tmp_path: Path) -> None:
    f = tmp_path / "one.md"
    f.write_text("Just one.", encoding="utf-8")
    assert [d.source for d in read_all(f)] == ["one.md"]  # type: ignore[union-attr]


# -- chunking --------------------------------------------------------------------------------------


def _text(n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    words = "tide moon lens keeper starter dough wheel trail queen comb".split()
    parts = []
    for _ in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        parts.append(s.capitalize() + rng.choice([". ", "! ", "? ", ".\n\n", ".\n- ", "\n\n"]))
    return "".join(parts)


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (64, 0), (64, 16), (512, 100), (200, 0)])
def test_chunks_respect_size_keep_all_text_and_are_deterministic(size: int, overlap: int) -> None:
    text = _text(800)
    chunks = chunking.chunk_text(text, size, overlap)
    assert chunks == chunking.chunk_text(text, size, overlap)
    limit = size * chunking.CHARS_PER_TOKEN
    for c in chunks:
        assert c.text == text[c.start:c.end] and c.text == c.text.strip() and c.text
        assert len(c.text) <= limit * (1 + chunking.MIN_TAIL)
    assert all(len(c.text) <= limit for c in chunks[:-1])
    # Every non-space character is in some chunk, in order.
    assert chunks[0].start == len(text) - len(text.lstrip()) and chunks[-1].end == len(text.rstrip())
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start <= a.end + (len(text[a.end:b.start]) - len(text[a.end:b.start].lstrip()))
        assert b.start > a.start
        if overlap == 0:
            assert b.start >= a.end
        else:
            assert a.end - b.start <= overlap * chunking.CHARS_PER_TOKEN
    if overlap == 0:
        assert re.sub(r"\s+", "", "".join(c.text for c in chunks)) == re.sub(r"\s+", "", text)


def test_chunks_end_at_sentence_boundaries_when_they_can() -> None:
    text = "First sentence is here. Second one follows it. Third closes the paragraph.\n\nA new paragraph starts."
    chunks = chunking.chunk_text(text, 12, 0)
    assert [c.text for c in chunks] == ["First sentence is here. Second one follows it.",
                                        "Third closes the paragraph.\n\nA new paragraph starts."]
    # Overlap repeats whole sentences.
    ov = chunking.chunk_text(text, 12, 6)
    assert ov[1].text.startswith("Second one follows it.")


def test_a_sentence_longer_than_a_chunk_is_cut_at_spaces() -> None:
    text = " ".join(f"word{i}" for i in range(400))
    chunks = chunking.chunk_text(text, 32, 0)
    assert len(chunks) > 5
    assert all(c.text.split()[0].startswith("word") and len(c.text) <= 128 for c in chunks)
    assert " ".join(c.text for c in chunks) == text
    nospace = "x" * 1000
    assert "".join(c.text for c in chunking.chunk_text(nospace, 32, 0)) == nospace


def test_small_and_empty_texts() -> None:
    assert chunking.chunk_text("", 64) == []
    assert chunking.chunk_text("  \n ", 64) == []
    assert [c.text for c in chunking.chunk_text(" One line. ", 64)] == ["One line."]
    with pytest.raises(ValueError, match="overlap"):
        chunking.chunk_text("x", 10, 6)


def test_sentences_cover_text_and_segments_group_them() -> None:
    text = _text(600)
    spans = chunking.sentences(text, 64)
    assert "".join(text[a:b] for a, b in spans).strip() == text.strip()
    assert all(text[a:b].strip() and b - a <= 64 * 4 + 8 for a, b in spans)
    segs = chunking.segments(spans, 16)
    assert segs[0][0] == 0 and segs[-1][1] == len(spans)
    assert all(b > a for a, b in segs) and all(x[1] == y[0] for x, y in zip(segs, segs[1:], strict=False))
    assert all(b - a <= chunking.SEGMENT_SENTENCES for a, b in segs)


def test_semantic_groups_cut_where_the_topic_changes() -> None:
    a, b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    vectors = [a, a, a, a, b, b, b, b]
    lengths = [40] * 8
    groups = chunking.semantic_groups(lengths, vectors, 100)  # 400 characters per chunk
    assert groups == [(0, 4), (4, 8)]
    # The size limit still applies within one topic.
    groups = chunking.semantic_groups([100] * 8, [a] * 8, 50)
    assert all(sum([100] * (e - s)) <= 200 for s, e in groups) and groups[-1][1] == 8
    with pytest.raises(ValueError, match="embeddings"):
        chunking.semantic_groups([1, 2], [a], 10)


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("1. What is a tide?", "What is a tide?"),
    ("2) What is a tide?", "What is a tide?"),
    ("(3) What is a tide?", "What is a tide?"),
    ("Q4: What is a tide?", "What is a tide?"),
    ("Question 5: What is a tide?", "What is a tide?"),
    ("- What is a tide?", "What is a tide?"),
    ("* What is a tide?", "What is a tide?"),
    ("\u2022 What is a tide?", "What is a tide?"),
    ("**1.** What is a tide?", "What is a tide?"),
    ("1. **What is a tide?**", "What is a tide?"),
    ("   10.   What   is a tide?  ", "What is a tide?"),
    ('"What is a tide?"', "What is a tide?"),
    ("\u201cWhat is a tide?\u201d", "What is a tide?"),
    ("What year was 1984 written?", "What year was 1984 written?"),
    ("3.5 million what?", "3.5 million what?"),
])
def test_question_numbering_and_bullets_are_stripped(line: str, expected: str) -> None:
    assert clean_question(line) == expected


def test_parse_questions_drops_blanks_duplicates_preambles_and_extra() -> None:
    content = ("Here are 4 questions:\n\n1. What is a tide?\n2. what is a  tide?\n\n3. Why do tides vary?\n"
               "4. ???\n5. Who decoded the bee dance?\n6. When did Fresnel design the lens?\n")
    qs, dropped = parse_questions(content, 3)
    assert qs == ["What is a tide?", "Why do tides vary?", "Who decoded the bee dance?"]
    assert dropped == {"not a question": 1, "duplicate": 1, "no letters": 1, "beyond the number asked": 1}
    assert parse_questions("Just one question here?", 5) == (["Just one question here?"], {})  # too few is fine
    assert parse_questions("", 5) == ([], {})
    assert parse_questions(None, 5) == ([], {})
    assert parse_questions("\n \n- \n", 5)[0] == []


@pytest.mark.parametrize(("content", "cot", "final"), [
    ("Reasoning ##begin_quote## x ##end_quote##.\n<ANSWER>: Fresnel", "Reasoning ##begin_quote## x ##end_quote##."
     "\n<ANSWER>: Fresnel", "Fresnel"),
    ("Because.\n<answer>: the Moon", "Because.\n<ANSWER>: the Moon", "the Moon"),
    ("A <ANSWER>: first draft. Then <ANSWER>: final", "A <ANSWER>: first draft. Then <ANSWER>: final", "final"),
    ("Reason <ANSWER> 42", "Reason <ANSWER>: 42", "42"),
    ("No tag at all", None, "no <ANSWER>: tag"),
    ("Reason <ANSWER>:   ", None, "nothing after <ANSWER>:"),
    ("", None, "empty answer"),
    (None, None, "empty answer"),
])
def test_parse_answer(content: str | None, cot: str | None, final: str) -> None:
    assert parse_answer(content) == (cot, final)


def test_final_answer() -> None:
    assert final_answer("reason <ANSWER>: yes") == "yes"
    assert final_answer("no tag") == "no tag"


# -- prompts ---------------------------------------------------------------------------------------


def test_builtin_prompts_in_both_styles() -> None:
    for style in ("gpt", "llama"):
        p = Prompts.build(style)
        q = p.question_messages("THE CHUNK", 4)
        assert q[-1] == {"role": "user", "content": "THE CHUNK"} and "generate 4 example questions" in q[0]["content"]
        a = p.answer_messages("THE QUESTION?", "THE CONTEXT")
        text = a[-1]["content"]
        assert text.startswith("Question: THE QUESTION?\nContext: THE CONTEXT")
        assert "##begin_quote##" in text and "<ANSWER>:" in text
    assert Prompts.build("gpt").digest != Prompts.build("llama").digest
    with pytest.raises(ConfigError, match="PROMPT_STYLE"):
        Prompts.build("claude")


def test_user_templates(tmp_path: Path) -> None:
    qt = tmp_path / "q.txt"
    qt.write_text("Write {n} questions about {context}. Braces {like} this stay.", encoding="utf-8")
    at = tmp_path / "a.json"
    at.write_bytes(orjson.dumps([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Q: {question}\nDocs: {context}"}]))
    p = Prompts.build("gpt", str(qt), str(at))
    q = p.question_messages("tides {question}", 2)
    assert q[-1]["content"] == "Write 2 questions about tides {question}. Braces {like} this stay."
    assert q[0]["role"] == "system"  # a text template keeps the built-in system messages
    assert p.answer_messages("why?", "ctx {n}") == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Q: why?\nDocs: ctx {n}"}]
    assert p.digest != Prompts.build("gpt").digest
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholders", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ASYNCRAFT_QUESTION_TEMPLATE.*must contain"):
        Prompts.build("gpt", str(bad))
    with pytest.raises(ConfigError, match=r"ASYNCRAFT_ANSWER_TEMPLATE.*\{question\}"):
        Prompts.build("gpt", None, str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        Prompts.build("gpt", str(tmp_path / "missing.txt"))
    notlist = tmp_path / "x.json"
    notlist.write_text('{"role": "user"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="list of"):
        Prompts.build("gpt", None, str(notlist))


# -- the job's tasks -------------------------------------------------------------------------------


def _job(tmp_path: Path, **kw: object) -> RaftJob:
    params = RaftParams(model="m", **kw)  # type: ignore[arg-type]
    return RaftJob(tmp_path, params)


def _completion(content: str | None, finish: str = "stop") -> Completion:
    return Completion({"content": content}, finish, {"prompt_tokens": 1, "completion_tokens": 1}, "m")


def test_task_ids_are_content_hashes_of_every_generation_parameter(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(_text(100), encoding="utf-8")
    base = [t.id for t in _job(tmp_path).roots()]
    assert base == [t.id for t in _job(tmp_path).roots()]
    assert len(set(base)) == len(base) > 2
    for change in ({"questions": 3}, {"chunk_size": 256}, {"prompt_style": "llama"},
                   {"extra_body": {"temperature": 0.5}}):
        other = [t.id for t in _job(tmp_path, **change).roots()]
        assert not set(other) & set(base), change
    # Overlap moves every chunk but the first: an identical request keeps its id (it is not paid twice).
    overlapped = [t.id for t in _job(tmp_path, chunk_overlap=32).roots()]
    assert overlapped[0] == base[0] and not set(overlapped[1:]) & set(base[1:])
    other_model = RaftJob(tmp_path, RaftParams(model="m2"))
    assert not {t.id for t in other_model.roots()} & set(base)
    # Assembly parameters change the dataset (fingerprint), not the calls (ids).
    assert [t.id for t in _job(tmp_path, distractors=5, p=0.5, seed=9).roots()] == base
    assert _job(tmp_path, distractors=5).fingerprint() != _job(tmp_path).fingerprint()


def test_questions_spawn_answers_and_retries_are_bounded(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("The Fresnel lens bends light toward the horizon. It was designed in 1822.",
                                    encoding="utf-8")
    job = _job(tmp_path, questions=2, answer_retries=2, structured="off")
    (task,) = [t for t in job.roots() if isinstance(t, Task)]
    assert task.stage == STAGE_QUESTIONS and task.meta["source"] == "a.txt" and task.meta["chunk_index"] == 0
    out = job.handle(task, _completion("1. Who designed it?\n2. When?\n3. Why?"))
    assert out.result is not None and out.result["questions"] == ["Who designed it?", "When?"]
    assert [c.stage for c in out.children] == [STAGE_ANSWERS] * 2
    assert out.children[0].meta == {"parent": task.id, "q": 0, "question": "Who designed it?", "form": "tagged"}
    # A question list cut off by max_tokens loses its last (maybe half) question.
    cut = job.handle(task, _completion("1. Who designed it?\n2. When was it desig", "length"))
    assert cut.result is not None and cut.result["questions"] == ["Who designed it?"]

    answer = out.children[0]
    seen = {orjson.dumps(answer.body)}
    t = answer
    for attempt in range(2):
        o = job.handle(t, _completion("No final tag here."))
        assert o.retry is not None and o.fail is None and o.retry.attempt == attempt + 1 and o.retry.id == answer.id
        assert "no <ANSWER>: tag" in o.retry_reason
        t = o.retry
        seen.add(orjson.dumps(t.body))
        # A resumed run asks the job for the same request of that attempt.
        assert job.retry_task(answer, attempt + 1).body == t.body
    assert len(seen) == 3  # every attempt is a different (separately paid) request
    final = job.handle(t, _completion("Still no tag."))
    assert final.fail is not None and "after 3 attempt(s)" in final.fail
    ok = job.handle(t, _completion("Because.\n<ANSWER>: Fresnel"))
    assert ok.result == {"message": {"content": "Because.\n<ANSWER>: Fresnel"}}
    # Every request is bounded; an answer cut off there is asked again once, with twice the room.
    assert answer.body["max_tokens"] == 400 and task.body["max_tokens"] == 2 * 40
    truncated = job.handle(answer, _completion("Because.\n<ANSWER>: Fres", "length"))
    assert truncated.retry is not None and "cut off" in truncated.retry_reason
    assert truncated.retry.body["max_tokens"] == 800
    again = job.handle(truncated.retry, _completion("Because, as said at length", "length"))
    assert again.fail is not None and "max_tokens=800" in again.fail and again.retry is None
    empty = job.handle(task, _completion("Sure! Here are the questions:"))
    assert empty.retry is not None and empty.retry.body != task.body


def test_recovery_rebuilds_children_without_new_calls(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Tides follow the Moon. Spring tides are large.", encoding="utf-8")
    job = _job(tmp_path, questions=2, max_records=2, structured="off")
    (task,) = [t for t in job.roots() if isinstance(t, Task)]
    out = job.handle(task, _completion("1. What do tides follow?\n2. Which tides are large?"))
    assert out.result is not None
    record = {"k": "done", "id": task.id, "stage": task.stage, **task.meta, **out.result}
    fresh = _job(tmp_path, questions=2, max_records=2, structured="off")
    assert fresh.wants("done", STAGE_QUESTIONS) and not fresh.wants("done", STAGE_ANSWERS)
    fresh.replay(record)
    from asyncraft.records import id_key

    done = {id_key(task.id), id_key(out.children[0].id)}
    children = list(fresh.recovered_children(done, set()))
    assert [c.id for c in children] == [out.children[1].id] and children[0].body == out.children[1].body
    assert fresh.limit_reached() is None
    fresh.handle(children[0], _completion("x <ANSWER>: big ones"))
    assert "record limit reached" in (fresh.limit_reached() or "")
    # The settled file is not read again by a watch-mode rescan.
    assert [x for x in fresh.roots() if isinstance(x, Task)] != []
    assert list(fresh.roots()) == []


def test_input_problems_from_roots(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("Fine text here.", encoding="utf-8")
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    items = list(_job(tmp_path).roots())
    problems = [x for x in items if isinstance(x, InputProblem)]
    assert [(p.key, p.detail) for p in problems] == [("doc:empty.md", {"path": "empty.md"})]
    assert sum(isinstance(x, Task) for x in items) == 1


def test_bad_overlap_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CHUNK_OVERLAP"):
        _job(tmp_path, chunk_size=100, chunk_overlap=60)


# -- assembly --------------------------------------------------------------------------------------


def _corpus(n: int) -> list[ChunkInfo]:
    return [ChunkInfo(f"c{i}", f"doc{i % 3}.md", "d", (0, i), f"text {i}", i) for i in range(n)]


def test_assembly_is_seeded_by_record_id_and_follows_p() -> None:
    corpus = _corpus(20)
    rec = assemble("r1", "Q?", "why <ANSWER>: x", corpus[4], corpus, 4, distractors=3, p=0.8, seed=0)
    assert rec == assemble("r1", "Q?", "why <ANSWER>: x", corpus[4], corpus, 4, distractors=3, p=0.8, seed=0)
    assert set(rec) == {"id", "type", "question", "context", "oracle_context", "cot_answer", "instruction",
                        "source", "chunk_index", "oracle_in_context"}
    docs = rec["context"]["sentences"][0]
    assert len(docs) == 4 and len(set(docs)) == 4 and len(rec["context"]["title"][0]) == 4
    assert rec["oracle_context"] == "text 4" and rec["source"] == "doc1.md" and rec["chunk_index"] == 4
    assert rec["instruction"] == "".join(f"<DOCUMENT>{d}</DOCUMENT>\n" for d in docs) + "Q?"
    assert ("text 4" in docs) == rec["oracle_in_context"]
    others = [assemble(f"r{i}", "Q?", "a", corpus[4], corpus, 4, distractors=3, p=0.8, seed=0) for i in range(400)]
    share = sum(r["oracle_in_context"] for r in others) / len(others)
    assert 0.72 < share < 0.88
    assert all(len(set(r["context"]["sentences"][0])) == 4 for r in others)
    never = [assemble(f"r{i}", "Q?", "a", corpus[4], corpus, 4, distractors=3, p=0.0, seed=0) for i in range(50)]
    assert not any("text 4" in r["context"]["sentences"][0] for r in never)
    reseeded = assemble("r1", "Q?", "a", corpus[4], corpus, 4, distractors=3, p=0.8, seed=1)
    assert [assemble(f"r{i}", "Q?", "a", corpus[4], corpus, 4, distractors=3, p=0.8, seed=1)["context"]
            for i in range(10)] != [r["context"] for r in others[:10]] or reseeded != rec


def test_too_small_corpus_gives_fewer_distractors() -> None:
    one = _corpus(1)
    rec = assemble("r", "Q?", "a", one[0], one, 0, distractors=3, p=1.0, seed=0)
    assert rec["context"]["sentences"] == [["text 0"]]
    dropped = assemble("r", "Q?", "a", one[0], one, 0, distractors=3, p=0.0, seed=0)
    assert dropped["context"]["sentences"] == [[]] and dropped["instruction"] == "Q?"
    two = _corpus(2)
    rec = assemble("r", "Q?", "a", two[1], two, 1, distractors=3, p=1.0, seed=0)
    assert sorted(rec["context"]["sentences"][0]) == ["text 0", "text 1"]


def test_split_assignment_is_exact_and_stable() -> None:
    ids = [f"{i:032x}" for i in range(1000)]
    a = split_assignment(ids, "eval=0.1,test=0.05", 0)
    assert sum(v == "eval" for v in a.values()) == 100 and sum(v == "test" for v in a.values()) == 50
    assert split_assignment(list(reversed(ids)), "eval=0.1,test=0.05", 0) == a
    assert split_assignment(ids, "eval=0.1,test=0.05", 1) != a
    assert parse_split("eval=0.1") == [("eval", 0.1)]
    for bad in ("eval", "eval=2", "eval=0.6,test=0.5", "e v=0.1", "eval=x", "a=0.1,a=0.2"):
        with pytest.raises(ValueError):
            parse_split(bad)
    with pytest.raises(ConfigError, match="ASYNCRAFT_SPLIT"):
        load("export", {}, {"ASYNCRAFT_SPLIT": "eval=1.5"})
