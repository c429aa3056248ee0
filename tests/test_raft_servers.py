"""The RAFT job against servers that behave like real ones and unlike the simulator, in seconds: a
fake OpenAI server on 127.0.0.1 (port 0) per test, scripted to refuse or ignore ``response_format``,
to answer embeddings with one vector per token, or to answer nothing; the real CLI in a subprocess.
The content of its replies is the simulator's (``simcontent``), so the RAFT shapes are right.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from asyncraft import simcontent
from asyncraft.simulate import body_hash
from tests.conftest import cli_env
from tests.helpers import ROOT, journal_records

DOCS = ROOT / "asyncraft" / "data" / "docs"
FLAGS = ("--job", "raft", "--questions", "2", "--chunk-size", "128")

Behaviour = Callable[[dict[str, Any]], web.Response | None]


class FakeServer:
    """Chat and embeddings with the simulator's content; ``behaviour`` may answer a request instead."""

    def __init__(self, behaviour: Behaviour | None = None, *, embed: Callable[[int, str], Any] | None = None) -> None:
        self.behaviour = behaviour
        self.embed = embed
        self.paid: Counter[str] = Counter()  # request bodies answered 200
        self.refused: Counter[str] = Counter()
        self.base_url = ""

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        special = self.behaviour(body) if self.behaviour is not None else None
        if special is not None:
            if special.status != 200:
                self.refused[body_hash(body)] += 1
                return special
        self.paid[body_hash(body)] += 1
        if special is not None:
            return special
        content = simcontent.chat_reply(body)
        return web.json_response({"id": "x", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 100, "completion_tokens": len(content) // 4}})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.paid[body_hash(body)] += 1
        embed = self.embed or (lambda _i, text: simcontent.embed(text, 16))
        data = [{"object": "embedding", "index": i, "embedding": embed(i, text)}
                for i, text in enumerate(body["input"])]
        return web.json_response({"object": "list", "data": data, "model": body.get("model"),
                                  "usage": {"prompt_tokens": 10, "total_tokens": 10}})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []

    async def start(behaviour: Behaviour | None = None, **kw: Any) -> FakeServer:
        server = FakeServer(behaviour, **kw)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", server.chat)
        app.router.add_post("/v1/embeddings", server.embeddings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        server.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


async def run(server: FakeServer, state: Path, *args: str, **env: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncraft", "run", *FLAGS, "--input", str(DOCS), "--state-dir", str(state), *args,
        env=cli_env(None, ASYNCRAFT_BASE_URL=server.base_url, **env), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def records(state: Path) -> list[dict[str, Any]]:
    return list(journal_records(state))


def refuse_json_schema(status: int, message: str) -> Behaviour:
    def behaviour(body: dict[str, Any]) -> web.Response | None:
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)
        return None

    return behaviour


@pytest.mark.parametrize(("status", "message"), [
    pytest.param(500, "1 validation error: {'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be "
                 "'text' or 'json_object'\"}", marks=pytest.mark.slow),  # llama-cpp-python
    (400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."),
])
async def test_a_server_that_refuses_the_openai_form_gets_the_other_and_nothing_is_paid_twice(
        serve: Callable[..., Any], tmp_path: Path, status: int, message: str) -> None:
    server = await serve(refuse_json_schema(status, message))
    code, err = await run(server, tmp_path / "state")
    assert code == 0, err
    assert "refuses response_format of type json_schema" in err and err.count("asking with type json_object") == 1
    assert server.paid and max(server.paid.values()) == 1
    recs = records(tmp_path / "state")
    done = [r for r in recs if r["k"] == "done"]
    assert {r["form"] for r in done} == {"json_object"} and not [r for r in recs if r["k"] == "fail"]
    assert sum(1 for r in done if r["stage"] == "answers") == sum(len(r["questions"]) for r in done
                                                                 if r["stage"] == "questions")
    # A resumed run asks in the form the journal remembers: no refusal, and nothing to pay.
    server.paid.clear()
    server.refused.clear()
    code, err = await run(server, tmp_path / "state")
    assert code == 0 and not server.paid and not server.refused, err


async def test_a_server_that_ignores_response_format_gets_free_text_prompts(serve: Callable[..., Any],
                                                                           tmp_path: Path) -> None:
    def ignore(body: dict[str, Any]) -> web.Response | None:
        plain = {k: v for k, v in body.items() if k != "response_format"}
        content = simcontent.chat_reply(plain)
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 100, "completion_tokens": 50}})

    server = await serve(ignore)
    code, err = await run(server, tmp_path / "state", ASYNCRAFT_CONCURRENCY="1")
    assert code == 0, err
    assert err.count("ignores response_format") == 1
    recs = records(tmp_path / "state")
    assert [r["form"] for r in recs if r["k"] == "attempt"] == ["json_schema"]  # the one reply that showed it
    assert {r["form"] for r in recs if r["k"] == "done"} == {"tagged"}
    assert max(server.paid.values()) == 1
    server.paid.clear()
    code, err = await run(server, tmp_path / "state", ASYNCRAFT_CONCURRENCY="1")
    assert code == 0 and not server.paid, err


async def test_per_token_embeddings_are_pooled_for_the_semantic_chunker(serve: Callable[..., Any],
                                                                        tmp_path: Path) -> None:
    # llama.cpp without pooling: one vector per token (here: per word).
    server = await serve(embed=lambda _i, text: [simcontent.embed(w, 16) for w in text.split()])
    state = tmp_path / "state"
    code, err = await run(server, state, "--chunker", "semantic", "--max-records", "1", ASYNCRAFT_CONCURRENCY="2")
    assert code in (0, 75) and "Traceback" not in err, err
    embeds = [r for r in records(state) if r.get("stage") == "embed"]
    assert len(embeds) == 5 and all(r["k"] == "done" and len(r["chunks"]) > 1 for r in embeds)
    assert "mean-pools" in err


async def test_embeddings_of_the_wrong_shape_are_failed_not_journaled_as_done(serve: Callable[..., Any],
                                                                             tmp_path: Path) -> None:
    server = await serve(embed=lambda i, _text: [0.5] * (8 + i % 2))
    state = tmp_path / "state"
    code, err = await run(server, state, "--chunker", "semantic", "--answer-retries", "1")
    assert code == 75, err  # nothing succeeded: the run says so instead of finishing with an empty dataset
    assert "no task succeeded" in err
    embeds = [r for r in records(state) if r.get("stage") == "embed"]
    assert {r["k"] for r in embeds} == {"attempt", "fail"} and len(embeds) == 10
    assert all("different lengths (8, 9)" in (r.get("why") or r["error"]["message"]) for r in embeds)
    assert "5 x embed: malformed embeddings response" in err


async def test_a_server_without_a_chat_template_stops_the_run_with_the_hint(serve: Callable[..., Any],
                                                                           tmp_path: Path) -> None:
    def empty(body: dict[str, Any]) -> web.Response:
        return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 50, "completion_tokens": 0}})

    server = await serve(empty)
    code, err = await run(server, tmp_path / "state", ASYNCRAFT_CONCURRENCY="1")
    assert code == 75, err
    assert "empty replies with 0 completion tokens" in err and "chat template" in err
    assert sum(server.paid.values()) == 3


async def test_the_quality_stop_fires_within_the_first_answers(serve: Callable[..., Any], tmp_path: Path) -> None:
    """A model that never writes the final-answer tag (the simulator's marker in the answer prompt)."""
    template = tmp_path / "answer.txt"
    template.write_text(f"Question: {{question}}\nContext: {{context}}\n{simcontent.NO_ANSWER_TAG_MARKER} Answer "
                        "with ##begin_quote## quotes and <ANSWER>: at the end.", encoding="utf-8")
    server = await serve()
    state = tmp_path / "state"
    code, err = await run(server, state, "--structured", "off", "--answer-template", str(template),
                          ASYNCRAFT_CONCURRENCY="1")
    assert code == 75, err
    assert "quality stop: 15 of the first" in err and "no <ANSWER>: tag" in err
    assert "the model returned, for example: '##Reason:" in err and "--quality-stop 1" in err
    answers = [r for r in records(state) if r.get("stage") == "answers" and r["k"] in ("done", "attempt", "fail")]
    assert 15 <= len(answers) <= 30 and not [r for r in answers if r["k"] == "done"]
    # Going on anyway is one flag away.
    code, err = await run(server, state, "--structured", "off", "--answer-template", str(template),
                          "--quality-stop", "1", ASYNCRAFT_CONCURRENCY="8")
    assert code == 0 and "quality stop" not in err, err
    assert orjson.loads((state / "status.json").read_bytes())["failed"] > 0
