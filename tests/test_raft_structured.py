"""Constrained output, the question filter and validated responses: the RAFT job's judgement of a reply,
in milliseconds, on made-up replies and on replies real small models returned (``tests/data/real-replies.json``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft import structured, validate
from asyncraft.errors import BadRequest, RateLimited, ServerError
from asyncraft.failures import FailureTally
from asyncraft.jobs.base import Task
from asyncraft.jobs.raft import IGNORED, STAGE_ANSWERS, STAGE_EMBED, STAGE_QUESTIONS, RaftJob, RaftParams
from asyncraft.provider import Completion
from asyncraft.raft_prompts import Prompts, reads_as_question, select_questions

CHUNK = ("The Fresnel lens was designed in 1822 by Augustin Fresnel. It bends light from a small lamp into a "
         "narrow beam that can be seen \u201cmore than twenty miles\u201d away.\nLighthouses are told apart by "
         "their light characteristic.")


def job_at(tmp_path: Path, text: str = CHUNK, **kw: Any) -> tuple[RaftJob, Task]:
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    job = RaftJob(tmp_path, RaftParams(model="m", questions=3, **kw))
    (task,) = [t for t in job.roots() if isinstance(t, Task)]
    return job, task


def reply(content: Any, finish: str = "stop", completion_tokens: int = 20) -> Completion:
    return Completion({"content": content}, finish, {"prompt_tokens": 100, "completion_tokens": completion_tokens}, "m")


# -- requests ----------------------------------------------------------------------------------------


def test_requests_are_bounded_and_ask_for_the_schema_in_the_openai_dialect_first(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    rf = task.body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
    schema = rf["json_schema"]["schema"]
    assert schema["properties"]["questions"]["maxItems"] == 3 and schema["additionalProperties"] is False
    assert task.body["max_tokens"] == 3 * 40 and task.meta["form"] == "json_schema"
    assert '{"questions": [...]}' in task.body["messages"][1]["content"]
    answer = job.answer_task(task.id, 0, "Who designed the lens?", CHUNK)
    # One schema for every answer of the run in OpenAI's dialect (OpenAI processes each new one at length)...
    quotes = answer.body["response_format"]["json_schema"]["schema"]["properties"]["quotes"]
    assert quotes == {"type": "array", "items": {"type": "string"}, "minItems": 1}
    assert answer.body["max_tokens"] == 400
    # ... and in llama.cpp's, where a grammar is built per request, quotes can only be the chunk's sentences.
    job.form = "json_object"
    answer = job.answer_task(task.id, 0, "Who designed the lens?", CHUNK)
    assert answer.body["response_format"]["schema"]["properties"]["quotes"]["items"]["enum"] == [
        "The Fresnel lens was designed in 1822 by Augustin Fresnel.",
        "It bends light from a small lamp into a narrow beam that can be seen \u201cmore than twenty miles\u201d away.",
        "Lighthouses are told apart by their light characteristic."]
    # The user's bound wins, in every form; so does off.
    job2, task2 = job_at(tmp_path, extra_body={"max_completion_tokens": 77}, structured="off")
    assert "max_tokens" not in task2.body and task2.body["max_completion_tokens"] == 77
    assert "response_format" not in task2.body and task2.meta["form"] == "tagged"
    assert task2.id != task.id


def test_the_question_pattern_admits_one_line_questions_only() -> None:
    ok = re.compile(structured.QUESTION_PATTERN)
    assert ok.match("When was the lens designed?")
    for bad in ("A statement.", "Two\nlines?", 'A "quoted" word?', "No mark"):
        assert not ok.match(bad), bad


def test_a_refused_form_is_asked_again_in_the_next_one_and_the_run_goes_on_in_it(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    llama_cpp_python = ServerError(
        "HTTP 500 from http://127.0.0.1:8000/v1: 1 validation error: {'type': 'literal_error', 'loc': ('body', "
        "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}", status=500)
    second = job.call_failed(task, llama_cpp_python)
    assert second is not None and second.id != task.id and second.attempt == 0
    assert second.body["response_format"] == {"type": "json_object",
                                              "schema": task.body["response_format"]["json_schema"]["schema"]}
    assert second.id == job.question_task(CHUNK, {"source": "a.txt", "doc": task.meta["doc"],
                                                  "chunk_index": 0}).id  # as a run that knew the form
    assert second.body["messages"] == task.body["messages"] and job.form == "json_object"
    openai = BadRequest("HTTP 400: Invalid parameter: 'response_format' of type 'json_object' is not supported "
                        "with this model.", status=400)
    third = job.call_failed(second, openai)
    assert third is not None and "response_format" not in third.body and job.form == "tagged"
    fresh_job, fresh = job_at(tmp_path, structured="off")
    assert third.id == fresh.id and third.body == fresh.body  # the same request as a run with --structured off
    # New tasks are made in the learned form, and one queued before is remade before its call.
    assert job.question_task("Another chunk.", {}).meta["form"] == "tagged"
    assert job.refresh(task) == third and job.refresh(third) is third
    # Other errors are the scheduler's business.
    assert job.call_failed(task, ServerError("HTTP 500: overloaded", status=500)) is None
    assert job.call_failed(task, ServerError("HTTP 500 from http://structured-output.example/v1: down",
                                             status=500)) is None
    assert job.call_failed(task, RateLimited("HTTP 429: slow down response_format", status=429)) is None
    assert job.call_failed(third, openai) is None  # free text refused: the task fails as any 400
    assert job.limit_reached() is None


def test_structured_on_never_falls_back_to_free_text(tmp_path: Path) -> None:
    job, task = job_at(tmp_path, structured="on")
    second = job.call_failed(task, BadRequest("HTTP 422", status=422))
    assert second is not None and second.meta["form"] == "json_object"
    assert job.call_failed(second, BadRequest("HTTP 422", status=422)) is None
    assert "--structured auto" in (job.limit_reached() or "")


def test_a_server_that_ignores_response_format_gets_free_text_prompts(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    job, task = job_at(tmp_path)
    out = job.handle(task, reply("1. Who designed the Fresnel lens?\n2. How far can the beam be seen?"))
    assert out.retry is not None and out.retry_reason == IGNORED and out.retry.meta["form"] == "tagged"
    assert "response_format" not in out.retry.body and job.form == "tagged"
    assert "ignores response_format" in caplog.text
    # JSON that does not parse is the model's fault, not the server's.
    job2, task2 = job_at(tmp_path)
    bad = job2.handle(task2, reply('{"questions": "Who designed it?"'))
    assert bad.retry is not None and bad.retry_reason == "reply is not valid JSON" and job2.form == "json_schema"
    # A resumed run learns the form from the journal: the attempt record, or a question record.
    resumed, _ = job_at(tmp_path)
    resumed.replay({"k": "attempt", "id": task.id, "stage": STAGE_QUESTIONS, "why": IGNORED})
    assert resumed.form == "tagged"
    other, _ = job_at(tmp_path)
    other.replay({"k": "done", "id": task.id, "stage": STAGE_QUESTIONS, "form": "json_object", "text": CHUNK,
                  "questions": []})
    assert other.form == "json_object"
    off, _ = job_at(tmp_path, structured="off")
    off.replay({"k": "done", "id": task.id, "stage": STAGE_QUESTIONS, "form": "json_object", "text": CHUNK,
                "questions": []})
    assert off.form == "tagged"


def test_retries_strip_and_add_their_notes_exactly(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    retry = job.retry_task(task, 2)
    assert retry.id == task.id and retry.attempt == 2 and retry.body["max_tokens"] == 2 * task.body["max_tokens"]
    assert "(Attempt 3:" in retry.body["messages"][1]["content"]
    # Any attempt can be turned into another form and back into the first request.
    assert job.retry_task(retry, 0).body == task.body
    tagged = job.call_failed(retry, BadRequest("HTTP 422", status=422))
    assert tagged is not None and "(Attempt" not in orjson.dumps(tagged.body).decode()


# -- questions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "ok"), [
    ("When was the lens designed?", True),
    ("\u00bfCu\u00e1ndo se dise\u00f1\u00f3 la lente?", True),
    ("\u30ec\u30f3\u30ba\u306f\u3044\u3064\uff1f", True),
    ("How do tides work", True),  # forgot its mark
    ("Which lighthouse is the oldest", True),
    ("How many keepers lived there", True),
    ("Wie funktioniert eine Linse", True),
    ("How a bicycle stays upright", False),  # a heading
    ("When the flour and water were mixed together, it was", False),
    ("how to do it themselves: cut wax from combs.", False),
    ("A honeybee colony is a family of one queen", False),
    ("]}, {'question': '12.73300', 'title': 'Why does the sea rise and fall?", False),
])
def test_a_question_reads_as_one(line: str, ok: bool) -> None:
    assert reads_as_question(line) is ok


def test_questions_copied_from_the_chunk_or_the_prompt_and_overlong_ones_are_dropped_and_counted() -> None:
    source = CHUNK + "\nan example question could be 'How many states are in the United States?'"
    qs, dropped = select_questions([
        "The Fresnel lens was designed in 1822 by Augustin Fresnel?",  # a statement with a mark: a copy
        "How many states are in the United States?",  # the prompt's example
        "Who designed the Fresnel lens?",
        "Why " + "very " * 40 + "long?",
        "who designed the  fresnel lens?",
        "How far can the beam be seen?",
    ], 5, source)
    assert qs == ["Who designed the Fresnel lens?", "How far can the beam be seen?"]
    assert dropped == {"copied": 2, "too long": 1, "duplicate": 1}


def test_structured_questions_keep_complete_strings_of_a_reply_cut_off(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    cut = job.handle(task, reply('{"questions": ["Who designed the lens?", "How far is the bea', "length"))
    assert cut.result is not None and cut.result["questions"] == ["Who designed the lens?"]
    assert [c.meta["question"] for c in cut.children] == ["Who designed the lens?"]
    empty = job.handle(task, reply('{"questions": []}'))
    assert empty.retry is not None and empty.retry_reason == "no questions in the reply"
    # Raw line breaks inside strings, which llama.cpp grammars let through, are forgiven.
    raw = job.handle(task, reply('{"questions": ["Who designed\nthe lens?"]}'))
    assert raw.result is not None and raw.result["questions"] == ["Who designed the lens?"]


# -- answers -----------------------------------------------------------------------------------------


def test_find_quote_forgives_typography_and_spacing_but_nothing_else() -> None:
    assert structured.find_quote('"more than twenty miles" away', CHUNK) == "\u201cmore than twenty miles\u201d away"
    assert structured.find_quote("the fresnel  lens was\ndesigned in 1822...", CHUNK) == (
        "The Fresnel lens was designed in 1822")
    assert structured.find_quote("The Fresnel lens was invented in 1822", CHUNK) is None
    assert structured.find_quote("..", CHUNK) is None


def test_structured_answers_are_assembled_into_raft_text(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    answer = job.answer_task(task.id, 0, "Who designed the lens?", CHUNK)
    content = orjson.dumps({
        "reasoning": "The context names the designer ##begin_quote## and the year.",
        "quotes": ["the Fresnel lens was designed in 1822 by Augustin Fresnel", "Invented by Edison.",
                   "The Fresnel lens was designed in 1822 by Augustin Fresnel."],
        "answer": "<ANSWER>: Augustin Fresnel"}).decode()
    out = job.handle(answer, reply(content))
    assert out.result == {"message": {"content": (
        "The context names the designer  and the year.\n"
        "##begin_quote##The Fresnel lens was designed in 1822 by Augustin Fresnel.##end_quote##\n"
        "<ANSWER>: Augustin Fresnel")}}
    for fields, why in [({"quotes": ["Invented by Edison."], "answer": "Fresnel"}, "no quote"),
                        ({"quotes": ["Lighthouses are told apart"], "answer": " . "}, "no final answer"),
                        ({"quotes": "Lighthouses", "answer": "x"}, "no quote")]:
        rejected = job.handle(answer, reply(orjson.dumps({"reasoning": "r", **fields}).decode()))
        assert rejected.retry is not None and why in rejected.retry_reason


def test_an_answer_that_repeats_the_prompt_is_rejected(tmp_path: Path) -> None:
    job, task = job_at(tmp_path, structured="off")
    answer = job.answer_task(task.id, 0, "Who designed the lens?", CHUNK)
    echo = ("First provide step-by-step reasoning on how to answer the question. In the reasoning, if you need to "
            "copy paste some sentences from the context, include them in ##begin_quote## and ##end_quote##.\n"
            "<ANSWER>: $answer, the answer should be succinct.")
    out = job.handle(answer, reply(echo))
    assert out.retry is not None and "repeats the prompt" in out.retry_reason
    fine = job.handle(answer, reply("To answer the question, we look at the context. ##begin_quote##The Fresnel "
                                    "lens was designed in 1822 by Augustin Fresnel.##end_quote##\n<ANSWER>: Fresnel"))
    assert fine.result is not None
    assert not Prompts.build("llama").repeats_instructions("")


# -- validated responses -----------------------------------------------------------------------------


def test_embeddings_are_one_vector_per_input_of_one_length() -> None:
    assert validate.embedding_vectors([[1, 0], [0.5, 0.5]], 2) == ([[1, 0], [0.5, 0.5]], 0)
    # llama.cpp without pooling: one vector per token, mean-pooled.
    assert validate.embedding_vectors([[[1, 0], [0, 1]], [[2, 2]]], 2) == ([[0.5, 0.5], [2.0, 2.0]], 2)
    for vectors, n, why in [
        ([[1, 0]], 2, "1 vector(s) for 2 input(s)"),
        ([[1, 0], [1, 0, 0]], 2, "different lengths (2, 3)"),
        ([[[1, 0], [1]], [[1, 0]]], 2, "input 0: per-token vectors"),
        ([["a", "b"]], 1, "input 0: the embedding is not a list of numbers"),
        ([[]], 1, "input 0"),
        ([[float("nan")]], 1, "input 0"),
        ({"data": 1}, 1, "no list of vectors"),
    ]:
        with pytest.raises(validate.Malformed, match=re.escape(why)):
            validate.embedding_vectors(vectors, n)


def test_a_malformed_embeddings_response_is_retried_then_failed_without_its_numbers(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("One sentence here. Another one there. A third one.", encoding="utf-8")
    job = RaftJob(tmp_path, RaftParams(model="m", chunker="semantic", answer_retries=1))
    (task,) = [t for t in job.roots() if isinstance(t, Task)]
    assert task.stage == STAGE_EMBED
    n = len(task.body["input"])
    bad = Completion({"embeddings": [[0.1] * 8] * (n - 1) + [[0.1] * 9]}, None, None, None)
    out = job.handle(task, bad)
    assert out.retry is not None and "malformed embeddings response" in out.retry_reason
    assert out.retry.body == task.body and out.retry.id == task.id
    assert bad.message == {"embeddings": f"list[{n}] of list[8] of float"}  # what the journal gets
    assert job.handle(out.retry, Completion({"embeddings": []}, None, None, None)).fail is not None
    pooled = job.handle(task, Completion({"embeddings": [[[0.1] * 8, [0.2] * 8]] * n}, None, None, None))
    assert pooled.result is not None and pooled.result["chunks"] and pooled.children


def test_empty_replies_with_zero_tokens_stop_the_run_with_the_hint(tmp_path: Path) -> None:
    job, task = job_at(tmp_path)
    for _ in range(2):
        assert job.handle(task, reply("", completion_tokens=0)).retry is not None
        assert job.limit_reached() is None
    job.handle(task, reply(None, completion_tokens=0))
    assert "chat template" in (job.limit_reached() or "")
    # Once a reply had text, an empty one is only a rejected reply.
    job2, task2 = job_at(tmp_path)
    job2.handle(task2, reply('{"questions": ["Who designed the lens?"]}'))
    for _ in range(5):
        job2.handle(task2, reply("", completion_tokens=0))
    assert job2.limit_reached() is None


def test_the_quality_stop_fires_on_mostly_rejected_replies_and_says_what_came_back(tmp_path: Path) -> None:
    job, task = job_at(tmp_path, structured="off")
    answer = job.answer_task(task.id, 0, "Who designed the lens?", CHUNK)
    good = reply("Because.\n<ANSWER>: Fresnel")
    bad = reply("The lens is a lens and I like it very much.")
    for _ in range(5):
        job.handle(answer, good)
    for i in range(14):
        job.handle(answer, bad)
        assert job.limit_reached() is None, i
    job.handle(answer, bad)  # 15 of the first 20 rejected: over 70 %
    message = job.limit_reached() or ""
    assert message.startswith("quality stop: 15 of the first 20 answers were rejected (no <ANSWER>: tag: 15)")
    assert "I like it very much" in message and "--structured on" in message and "--quality-stop 1" in message
    # Only the first replies of a run count, and 1 never stops.
    late, _ = job_at(tmp_path, structured="off")
    for _ in range(20):
        late.handle(answer, good)
    for _ in range(40):
        late.handle(answer, bad)
    assert late.limit_reached() is None
    never, _ = job_at(tmp_path, structured="off", quality_stop=1.0)
    for _ in range(20):
        never.handle(answer, bad)
    assert never.limit_reached() is None


def test_a_server_without_embeddings_stops_the_run(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("One sentence here. Another one there.", encoding="utf-8")
    job = RaftJob(tmp_path, RaftParams(model="m", chunker="semantic"))
    (task,) = [t for t in job.roots() if isinstance(t, Task)]
    err = ServerError("HTTP 500: Llama model must be created with embedding=True to call this method", status=500)
    assert job.call_failed(task, err) is None
    assert "--embedding true" in (job.limit_reached() or "")


def test_failures_are_summed_up_by_reason_with_one_example() -> None:
    tally = FailureTally()
    for i in range(3):
        tally.add({"k": "fail", "stage": STAGE_ANSWERS, "error": {"type": "job", "message":
                   f"no <ANSWER>: tag (after {i + 1} attempt(s))"}, "message": {"content": f"I think {i}\n so"}})
    tally.add({"k": "fail", "stage": STAGE_QUESTIONS, "error": {"type": "BadRequest", "message": "HTTP 400: no"}})
    tally.add({"k": "ierr", "msg": "a.pdf: no text"})
    lines = tally.lines()
    assert lines[0].startswith("4 task(s) failed")
    assert lines[1] == "  3 x answers: no <ANSWER>: tag (after 1 attempt(s)) - the reply was e.g. 'I think 0 so'"
    assert lines[2] == "  1 x questions: HTTP 400: no"
    assert FailureTally().lines() == []


def test_prompts_job_warns_once_about_lines_without_max_tokens(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from asyncraft.jobs.prompts import PromptsJob

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"messages": [{"role": "user", "content": str(i)}]}) + b"\n"
                             for i in range(3)))
    with caplog.at_level(logging.WARNING, logger="asyncraft"):
        assert len(list(PromptsJob(inp, model="m", extra_body={}).roots())) == 3
        list(PromptsJob(inp, model="m", extra_body={"max_tokens": 9}).roots())
    assert caplog.text.count("sets no max_tokens") == 1 and "line 1" in caplog.text


# -- real replies ------------------------------------------------------------------------------------


REAL = Path(__file__).parent / "data" / "real-replies.json"


def real_samples() -> list[dict[str, Any]]:
    data = orjson.loads(REAL.read_bytes())
    return [{**s, "chunk": data["chunks"][s["chunk"]]} for s in data["samples"]]


@pytest.mark.parametrize("sample", real_samples(), ids=lambda s: s["name"])
def test_recorded_real_replies_are_judged_as_people_would(sample: dict[str, Any], tmp_path: Path) -> None:
    """Each sample is what a real model returned for a request of this job (see the file's note); its
    ``expect`` is "accept" (a usable RAFT shape) or the start of the rejection reason."""
    params = RaftParams(model="m", questions=5, structured="off" if sample["form"] == "tagged" else "auto")
    job = RaftJob(tmp_path, params)
    job.form = sample["form"]
    chunk = sample["chunk"]
    if sample["stage"] == STAGE_QUESTIONS:
        task = job.question_task(chunk, {"source": "x"})
    else:
        task = job.answer_task("parent", 0, sample["question"], chunk)
    out = job.handle(task, Completion({"content": sample["reply"]}, sample["finish_reason"],
                                      {"prompt_tokens": 1, "completion_tokens": sample["completion_tokens"]}, "m"))
    if sample["expect"] != "accept":
        why = out.retry_reason if out.retry is not None else (out.fail or "")
        assert out.result is None and why.startswith(sample["expect"]), why
        return
    assert out.result is not None, out.retry_reason
    if sample["stage"] == STAGE_QUESTIONS:
        assert out.result["questions"] == sample["questions"]
        assert all(reads_as_question(q) and q not in chunk for q in out.result["questions"])
    else:
        cot = out.result["message"]["content"]
        assert cot.count("<ANSWER>:") == 1 and (sample["form"] == "tagged" or "##begin_quote##" in cot)
        for quote in cot.split("##begin_quote##")[1:]:
            assert quote.split("##end_quote##")[0] in chunk
