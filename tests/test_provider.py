"""The provider: streamed answers assembled into the non-streamed body, servers that cannot stream,
the stall rule, and errors at the boundary. In-process servers on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import copy
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web

from asyncraft.errors import BadRequest, ConnectionFailed, ProviderTimeout, ServerError, Unreachable
from asyncraft.provider import Provider, StreamAssembly
from asyncraft.simulate import SimConfig, Simulator

MESSAGES = {"model": "sim-1", "messages": [{"role": "user", "content": "Tell me about tides."}], "max_tokens": 64}

# -- assembly ----------------------------------------------------------------------------------------------


def plain_body(**message: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-x",
            "system_fingerprint": "fp_1", "service_tier": "default",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": None, **message},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def as_stream(body: dict[str, Any], rng: random.Random) -> bytes:
    """The server-sent events an OpenAI-style server sends for ``body``: text in pieces, tool call
    arguments in fragments, a logprob entry per piece, usage in a final chunk without choices."""
    head = {k: v for k, v in body.items() if k not in ("object", "choices", "usage")}
    events: list[dict[str, Any]] = []

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> None:
        events.append({**head, "object": "chat.completion.chunk",
                       "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    def pieces(text: str) -> list[str]:
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 else []
        return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]

    for choice in body["choices"]:
        i, msg = choice["index"], choice["message"]
        first = {"role": msg["role"], "content": "" if msg.get("content") is not None else None, "refusal": None}
        chunk(i, first)
        lp = choice.get("logprobs")
        for key in ("content", "refusal", "reasoning_content"):
            if isinstance(msg.get(key), str):
                parts = pieces(msg[key])
                for n, part in enumerate(parts):
                    tokens = {key: [lp[key][n]], "refusal": None} if lp and key == "content" else None
                    chunk(i, {key: part}, logprobs=tokens)
        for position, call in enumerate(msg.get("tool_calls") or []):
            args = call["function"]["arguments"]
            chunk(i, {"tool_calls": [{"index": position, "id": call["id"], "type": call["type"],
                                      "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for part in pieces(args):
                chunk(i, {"tool_calls": [{"index": position, "function": {"arguments": part}}]})
        chunk(i, {}, finish=choice["finish_reason"])
    events.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": body["usage"]})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


TEXT = plain_body(content="The tide rises twice a day, pulled by the moon.")
TOOLS = plain_body(tool_calls=[
    {"id": "call_a", "type": "function", "function": {"name": "get_tide", "arguments": '{"port": "Brest", "day": 3}'}},
    {"id": "call_b", "type": "function", "function": {"name": "get_moon", "arguments": '{"phase": "full"}'}}])
TOOLS["choices"][0]["finish_reason"] = "tool_calls"
REFUSAL = plain_body(refusal="I can't help with that request.")
REASONING = plain_body(content="42.", reasoning_content="The user asks for the answer; it is well known.")
LOGPROBS = plain_body(content="ab cd ef gh ij")
LOGPROBS["choices"][0]["logprobs"] = {
    "content": [{"token": f"t{n}", "logprob": -0.1 * n, "bytes": [116], "top_logprobs": []} for n in range(5)],
    "refusal": None}
TWO = plain_body(content="first answer")
TWO["choices"].append({"index": 1, "message": {"role": "assistant", "content": "second one", "refusal": None},
                       "logprobs": None, "finish_reason": "length"})


@pytest.mark.parametrize("body", [TEXT, TOOLS, REFUSAL, REASONING, LOGPROBS, TWO],
                         ids=["content", "tool-calls", "refusal", "reasoning", "logprobs", "two-choices"])
@pytest.mark.parametrize("crlf", [False, True])
def test_a_stream_assembles_into_exactly_the_non_streamed_body(body: dict[str, Any], crlf: bool) -> None:
    rng = random.Random(7)
    data = as_stream(body, rng)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    for _ in range(20):  # cut the bytes anywhere, as TCP may
        assembly = StreamAssembly()
        cuts = sorted(rng.sample(range(1, len(data)), 12))
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            assembly.feed(data[a:b])
        assert assembly.body() == body


def test_keep_alive_comments_and_multi_line_data_are_read_as_sse_says() -> None:
    assembly = StreamAssembly()
    first = orjson.dumps({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                                  "finish_reason": None}]})
    event = b"event: message\ndata: " + first[:10] + b"\ndata: " + first[10:] + b"\n\n"
    assembly.feed(b": OPENROUTER PROCESSING\n\n" + event)
    assembly.feed(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    out = assembly.body()  # no [DONE]: complete once every choice has its finish_reason
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert out["choices"][0]["finish_reason"] == "stop" and "usage" not in out


def test_a_stream_cut_before_the_end_is_not_an_answer() -> None:
    data = as_stream(TEXT, random.Random(1))
    assembly = StreamAssembly()
    assembly.feed(data[: len(data) // 2])
    with pytest.raises(ConnectionFailed, match="ended before the answer was complete"):
        assembly.body()


def test_an_error_event_in_the_stream_is_a_provider_error() -> None:
    assembly = StreamAssembly()
    with pytest.raises(ServerError, match="overloaded"):
        assembly.feed(b'data: {"error": {"message": "model overloaded\\nretry later", "code": 503}}\n\n')
    with pytest.raises(BadRequest, match="context"):
        StreamAssembly().feed(b'data: {"error": {"message": "context too long", "code": 400}}\n\n')


# -- against servers -------------------------------------------------------------------------------------------


@asynccontextmanager
async def simulator(**config: Any) -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(port=0, **config)) as sim:
        yield sim


@asynccontextmanager
async def provider(base_url: str, **kw: Any) -> AsyncIterator[Provider]:
    async with Provider(base_url, **{"api_key": "test-key-0123", **kw}) as p:
        yield p


def without_time(raw: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(raw or {})
    out.pop("created", None)
    return out


async def test_streamed_and_plain_calls_give_the_same_body_and_the_stream_is_the_default() -> None:
    async with simulator() as sim:
        async with provider(sim.base_url) as streamed, provider(sim.base_url, stream=False) as plain:
            a = await streamed.chat(MESSAGES)
            b = await plain.chat(MESSAGES)
        assert streamed.streams is True and plain.streams is False
        assert sim.stats.streamed == 1 and sim.stats.started == 2 and sim.stats.paid == 2
    assert without_time(a.raw) == without_time(b.raw)
    assert (a.message, a.finish_reason, a.usage, a.model) == (b.message, b.finish_reason, b.usage, b.model)
    assert a.usage is not None and a.usage["completion_tokens"] > 0


@pytest.mark.parametrize("mode", ["json", "refuse"])
async def test_a_server_that_cannot_stream_is_asked_plainly_from_then_on(mode: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    async with simulator(stream_mode=mode) as sim, provider(sim.base_url) as p:
        first = await p.chat(MESSAGES)
        second = await p.chat({**MESSAGES, "messages": [{"role": "user", "content": "And waves?"}]})
        assert p.streams is False and sim.stats.streamed == 0
        assert sim.stats.started == 2 and sim.stats.paid == 2  # the refused streamed request was not a generation
        assert sim.stats.requests == (3 if mode == "refuse" else 2)
    assert first.message["content"] and second.message["content"] and first.usage is not None
    assert "does not stream" in caplog.text and caplog.text.count("does not stream") == 1


async def test_a_stream_that_stops_sending_is_cancelled_after_the_stall_timeout() -> None:
    async with simulator() as sim, provider(sim.base_url, stall_timeout=0.3, request_timeout=30) as p:
        await p.chat(MESSAGES)  # the server has shown it streams: the stall timer is armed from now on
        sim.config.p_stall = 1.0
        t0 = time.monotonic()
        with pytest.raises(ProviderTimeout, match="stalled: no byte .* for 0.3s"):
            await p.chat({**MESSAGES, "max_tokens": 63})
        assert 0.25 < time.monotonic() - t0 < 5


async def test_a_slow_stream_that_keeps_sending_is_never_cancelled() -> None:
    """Each word arrives within the stall timeout, the whole answer takes several times longer."""
    async with simulator(latency_ms=100, token_ms=60) as sim, provider(sim.base_url, stall_timeout=0.3) as p:
        await p.chat({**MESSAGES, "max_tokens": 4})
        t0 = time.monotonic()
        out = await p.chat(MESSAGES)
        assert time.monotonic() - t0 > 0.9 and out.finish_reason in ("stop", "length")
        assert sim.stats.started == sim.stats.paid == 2


async def test_a_slow_plain_call_is_bounded_by_the_request_timeout_only() -> None:
    async with simulator(latency_ms=800) as sim:
        async with provider(sim.base_url, stream=False, stall_timeout=0.2, request_timeout=30) as p:
            out = await p.chat(MESSAGES)
        assert out.message["content"] and sim.stats.started == sim.stats.paid == 1
        async with provider(sim.base_url, stream=False, request_timeout=0.3) as p:
            with pytest.raises(ProviderTimeout, match="ASYNCRAFT_REQUEST_TIMEOUT"):
                await p.chat(MESSAGES)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_a_connection_closed_mid_stream_is_a_retryable_connection_failure() -> None:
    data = as_stream(TEXT, random.Random(3))

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(data[: len(data) // 3])
        assert request.transport is not None
        request.transport.close()
        return resp

    async with server(handler) as url, provider(url) as p:
        with pytest.raises(ConnectionFailed):
            await p.chat(MESSAGES)


async def test_nothing_listening_is_unreachable_and_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    async with provider(f"http://user:pw-secret@127.0.0.1:{port}/v1", api_key=None) as p:
        with pytest.raises(Unreachable) as err:
            await p.chat(MESSAGES)
    assert f"cannot connect to http://127.0.0.1:{port}/v1" in str(err.value) and "pw-secret" not in str(err.value)


async def test_models_lists_what_the_server_serves_or_none() -> None:
    async with simulator(models="sim-1,sim-embed") as sim, provider(sim.base_url) as p:
        assert await p.models() == ["sim-1", "sim-embed"]

    async def nothing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    async with server(nothing) as url, provider(url) as p:
        assert await p.models() is None
    await asyncio.sleep(0)
