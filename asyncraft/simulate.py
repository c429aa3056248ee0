"""``asyncraft simulate``: a built-in OpenAI-compatible server for tests, benchmarks and the demo.

It serves ``/v1/chat/completions`` (also streamed; ``n`` choices and ``logprobs`` as OpenAI returns
them), ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models`` with deterministic content (a function
of the request body only, so two simulators give the same answers), a latency distribution and a time
per generated token, injected faults (429 with Retry-After, 500/503, hangs, streams that stop,
connection resets, malformed bodies), optional key check, unknown models (404 as OpenAI, or 400 as
LiteLLM), an exhaustible quota, and server-side requests/tokens-per-minute limits, announced with
OpenAI's ``x-ratelimit-*`` headers, LiteLLM's ``x-ratelimit-api_key-*`` names, or not at all (a 429 with
Retry-After only). It can also behave like a server that cannot stream. ``/_sim/stats``,
``/_sim/config`` and ``/_sim/reset`` let tests count and steer it.

"Started" generations are the ones a real provider bills even if the client goes away: the request
passed every check and the model began to answer. "Paid" ones were answered completely.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from asyncraft import simcontent

ENV_PREFIX = "ASYNCRAFT_SIM_"


_TRANSPORT = ("stream", "stream_options")  # how the answer travels, not what is asked


def body_hash(body: Any) -> str:
    """The identity of a request body (key order and streaming ignored); the client computes the same."""
    if isinstance(body, dict) and any(k in body for k in _TRANSPORT):
        body = {k: v for k, v in body.items() if k not in _TRANSPORT}
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4)) if text else 0


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    latency_ms: float = 0.0  # median (lognormal), mean (exponential) or fixed value
    latency_dist: str = "fixed"  # fixed | uniform (0..2x) | lognormal | exponential
    latency_sigma: float = 0.5  # lognormal shape
    token_ms: float = 0.0  # time per generated token, after the latency (streamed: between chunks)
    p_429: float = 0.0
    p_500: float = 0.0
    p_503: float = 0.0
    p_hang: float = 0.0
    p_stall: float = 0.0
    p_reset: float = 0.0
    p_malformed: float = 0.0
    fault_retry_after: float = 1.0  # seconds sent in Retry-After with injected 429/503
    hang_seconds: float = 3600.0
    rpm: float = 0.0  # server-side requests/minute (0 = unlimited)
    tpm: float = 0.0  # server-side tokens/minute (0 = unlimited)
    limit_window: float = 1.0  # the limits are enforced per window of this many seconds (as OpenAI quantizes)
    limit_headers: str = "openai"  # openai | litellm | none
    api_key: str = ""  # when set, requests must carry it (Bearer or api-key header) or get 401
    models: str = ""  # comma-separated known models; empty = any model
    unknown_model_status: int = 404  # 404 (OpenAI) or 400 (LiteLLM's proxy)
    stream_mode: str = "sse"  # sse | json (answers streamed requests with plain JSON) | refuse (400)
    quota_calls: int = 0  # after this many paid calls, 429 insufficient_quota (0 = never)
    embedding_dim: int = 64
    seed: int = 0


_HELP = {
    "host": "address to bind (keep 127.0.0.1 unless you mean it)",
    "port": "port (0 = any free port; the chosen URL is printed)",
    "latency_ms": "latency in ms: the median (lognormal), mean (exponential/uniform) or exact value (fixed)",
    "latency_dist": "latency distribution: fixed, uniform, lognormal or exponential",
    "latency_sigma": "shape of the lognormal distribution",
    "token_ms": "time per generated token in ms, after the latency (a streamed answer sends each word as it comes)",
    "p_429": "probability of an injected 429 rate_limit_exceeded (with Retry-After)",
    "p_500": "probability of an injected 500",
    "p_503": "probability of an injected 503 (with Retry-After)",
    "p_hang": "probability that a request is accepted and never answered",
    "p_stall": "probability that a streamed answer stops after its first chunk (the connection stays open)",
    "p_reset": "probability that the connection is reset without an answer",
    "p_malformed": "probability of a 200 answer whose body is not valid JSON",
    "fault_retry_after": "seconds sent in Retry-After with injected 429/503",
    "hang_seconds": "how long a hung request is held before the connection is dropped",
    "rpm": "server-side requests/minute limit with x-ratelimit headers (0 = none)",
    "tpm": "server-side tokens/minute limit with x-ratelimit headers (0 = none)",
    "limit_window": "the per-minute limits are enforced per window of this many seconds, as real APIs do",
    "limit_headers": "how the limits are announced: openai (x-ratelimit-*), litellm (x-ratelimit-api_key-*) or "
                     "none (429 with a whole-second Retry-After only)",
    "api_key": "require this API key (401 otherwise); empty = accept any",
    "models": "comma-separated model names that exist (others are refused) and that /v1/models lists; empty = "
              "any model (and /v1/models answers 404)",
    "unknown_model_status": "status for an unknown model: 404 (as OpenAI) or 400 (as LiteLLM's proxy)",
    "stream_mode": "sse (stream when asked), json (answer streamed requests with plain JSON) or refuse (400 "
                   "for stream_options)",
    "quota_calls": "after this many paid calls answer 429 insufficient_quota (0 = never)",
    "embedding_dim": "dimension of /v1/embeddings vectors",
    "seed": "seed of the fault and latency random generator",
}


class _Window:
    """A limit enforced per window: ``per_minute * window / 60`` units fit in any window."""

    __slots__ = ("capacity", "level", "rate", "stamp", "per_minute")

    def __init__(self, per_minute: float, window: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * window)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, n: float) -> bool:
        self._refill()
        if self.level >= min(n, self.capacity):
            self.level -= n
            return True
        return False

    def reset_in(self) -> float:
        """Seconds until the window is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate) if self.rate else 0.0

    def wait_for(self, n: float) -> float:
        return max(0.001, (min(n, self.capacity) - self.level) / self.rate) if self.rate else 0.0


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 120ms."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.3g}s" if minutes else f"{secs:.3g}s"


@dataclass
class SimStats:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    started: int = 0  # generations begun: billed by a real provider even when the client goes away
    started_by_hash: Counter[str] = field(default_factory=Counter)
    streamed: int = 0  # answers sent as a stream
    paid: int = 0
    paid_by_hash: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    embeddings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "by_status": dict(self.by_status), "faults": dict(self.faults),
                "started": self.started, "started_by_hash": dict(self.started_by_hash), "streamed": self.streamed,
                "paid": self.paid, "paid_by_hash": dict(self.paid_by_hash), "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight, "embeddings": self.embeddings}


def _words(content: str) -> list[str]:
    """The pieces a streamed answer is sent in (and that logprobs are given for): a word and its space."""
    return re.findall(r"\S+\s*", content) or [content]


def _logprobs(content: str, top: int | None) -> dict[str, Any] | None:
    """A choice's logprobs, in OpenAI's chat shape, when the request asks for them (``top`` alternatives)."""
    if top is None:
        return None
    return {"content": [simcontent.token_logprobs(word, top) for word in _words(content)], "refusal": None}


def _error(status: int, message: str, etype: str, code: str | None, headers: dict[str, str] | None = None,
           ) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    # As OpenAI, an error answer has a request id too (a failed line's batch output shows it).
    request_id = "req_" + hashlib.blake2b(orjson.dumps([status, message]), digest_size=12).hexdigest()
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers={"x-request-id": request_id, **(headers or {})})


class Simulator:
    """The server. ``async with Simulator(cfg) as sim`` serves on ``sim.base_url`` until the block ends."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self._rng = random.Random(self.config.seed)
        self._runner: web.AppRunner | None = None
        self._limits_for: tuple[float, float, float] | None = None
        self._req_window: _Window | None = None
        self._tok_window: _Window | None = None
        self.base_url = ""
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_get("/v1/models", self._models)
        # Azure OpenAI routes: /openai/deployments/<name>/chat/completions?api-version=...
        self.app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        self.app.router.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)
        self.app.router.add_post("/openai/deployments/{deployment}/completions", self._completions)
        self.app.router.add_get("/_sim/stats", self._get_stats)
        self.app.router.add_post("/_sim/config", self._set_config)
        self.app.router.add_post("/_sim/reset", self._reset)

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        # Calls still "thinking" at shutdown are dropped after a second, not waited on.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, backlog=4096)
        await site.start()
        port = self._runner.addresses[0][1]  # the real port when 0 was asked for
        self.base_url = f"http://{self.config.host}:{port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- limits ------------------------------------------------------------------------------------

    def _windows(self) -> tuple[_Window | None, _Window | None]:
        cfg = self.config
        key = (cfg.rpm, cfg.tpm, cfg.limit_window)
        if key != self._limits_for:
            self._limits_for = key
            self._req_window = _Window(cfg.rpm, cfg.limit_window) if cfg.rpm > 0 else None
            self._tok_window = _Window(cfg.tpm, cfg.limit_window) if cfg.tpm > 0 else None
        return self._req_window, self._tok_window

    def _limit_headers(self, req: _Window | None, tok: _Window | None) -> dict[str, str]:
        style = self.config.limit_headers
        if style == "none":
            return {}
        prefix = "x-ratelimit-api_key-" if style == "litellm" else "x-ratelimit-"
        headers: dict[str, str] = {}
        for kind, window in (("requests", req), ("tokens", tok)):
            if window is not None:
                headers.update({f"{prefix}limit-{kind}": f"{window.per_minute:g}",
                                f"{prefix}remaining-{kind}": str(max(0, int(window.level)))})
                if style == "openai":
                    headers[f"{prefix}reset-{kind}"] = _duration(window.reset_in())
        return headers

    def _rate_limited(self, what: str, limit: float, wait: float, headers: dict[str, str]) -> web.Response:
        retry = {"retry-after": f"{math.ceil(wait)}"}
        if self.config.limit_headers != "none":
            retry["retry-after-ms"] = f"{wait * 1000:.0f}"
        return _error(429, f"Rate limit reached for {what} per min: Limit {limit:g}. Please try again in "
                      f"{_duration(wait)}.", what, "rate_limit_exceeded", {**retry, **headers})

    # -- handlers ----------------------------------------------------------------------------------

    def _check_auth(self, request: web.Request) -> web.Response | None:
        want = self.config.api_key
        if not want:
            return None
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("api-key", "")
        if given != want:
            # Echo the key like a careless server would, so tests can prove the client never writes it down.
            return _error(401, f"Incorrect API key provided: {given}.", "invalid_request_error", "invalid_api_key")
        return None

    async def _latency(self) -> None:
        cfg = self.config
        ms = cfg.latency_ms
        if ms <= 0:
            return
        if cfg.latency_dist == "lognormal":
            ms = ms * math.exp(self._rng.gauss(0.0, cfg.latency_sigma))
        elif cfg.latency_dist == "exponential":
            ms = self._rng.expovariate(1.0 / ms)
        elif cfg.latency_dist == "uniform":
            ms = self._rng.uniform(0, 2 * ms)
        await asyncio.sleep(ms / 1000.0)

    async def _hang(self, request: web.Request) -> None:
        deadline = time.monotonic() + self.config.hang_seconds
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.05)
        if request.transport is not None:
            request.transport.abort()

    def _fault(self) -> str | None:
        cfg = self.config
        r = self._rng.random()
        for name, p in (("429", cfg.p_429), ("500", cfg.p_500), ("503", cfg.p_503), ("hang", cfg.p_hang),
                        ("stall", cfg.p_stall), ("reset", cfg.p_reset), ("malformed", cfg.p_malformed)):
            if r < p:
                return name
            r -= p
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            resp = await self._chat_inner(request)
        finally:
            self.stats.in_flight -= 1
        self.stats.by_status[str(resp.status)] += 1
        return resp

    async def _read_json(self, request: web.Request) -> tuple[Any, bytes] | web.Response:
        """The request's JSON body and its bytes, or the refusal a server sends (401, or 400 for bad JSON)."""
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        raw = await request.read()
        try:
            return orjson.loads(raw), raw
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)

    async def _chat_inner(self, request: web.Request) -> web.StreamResponse:
        read = await self._read_json(request)
        if isinstance(read, web.Response):
            return read
        body, raw = read
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            return _error(400, "'messages' is a required property", "invalid_request_error", None)
        model = request.match_info.get("deployment") or body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", "invalid_request_error", None)
        unknown = self._unknown_model(model)
        if unknown is not None:
            return unknown
        cfg = self.config
        if body.get("stream") and cfg.stream_mode == "refuse" and "stream_options" in body:
            return _error(400, "Unrecognized request argument supplied: stream_options", "invalid_request_error",
                          None)
        if cfg.quota_calls and self.stats.paid >= cfg.quota_calls:
            return _error(429, "You exceeded your current quota, please check your plan and billing details.",
                          "insufficient_quota", "insufficient_quota")
        refused = simcontent.BAD_REQUEST.search(raw.decode("utf-8", "replace"))
        if refused is not None:
            reason = f": {refused.group(1)}" if refused.group(1) else ""
            return _error(400, f"Invalid 'messages': this request is rejected on purpose (simulator marker){reason}.",
                          "invalid_request_error", "invalid_value")
        text = simcontent.prompt_text(body)
        prompt_tokens = estimate_tokens(text)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        cost = prompt_tokens + (int(max_tokens) if isinstance(max_tokens, int) and max_tokens > 0 else 256)
        req_w, tok_w = self._windows()
        if req_w is not None and not req_w.take(1):
            self.stats.faults["rate_limit"] += 1
            return self._rate_limited("requests", cfg.rpm, req_w.wait_for(1), self._limit_headers(req_w, tok_w))
        if tok_w is not None and not tok_w.take(cost):
            if req_w is not None:
                req_w.level = min(req_w.capacity, req_w.level + 1)  # not served: give the request back
            self.stats.faults["rate_limit_tokens"] += 1
            return self._rate_limited("tokens", cfg.tpm, tok_w.wait_for(cost), self._limit_headers(req_w, tok_w))
        limit_headers = self._limit_headers(req_w, tok_w)
        fault = self._fault()
        streamed = bool(body.get("stream")) and cfg.stream_mode == "sse"
        n = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        top = (body["top_logprobs"] if isinstance(body.get("top_logprobs"), int) else 0) if body.get("logprobs") \
            else None
        if fault is None or fault == "stall":
            contents, finishes = [], []
            for i in range(n):
                content = simcontent.choice_reply(body, i)
                finish = "stop"
                if isinstance(max_tokens, int) and max_tokens > 0 and estimate_tokens(content) > max_tokens:
                    content = content[: max_tokens * 4]
                    finish = "length"
                contents.append(content)
                finishes.append(finish)
            completion_tokens = sum(estimate_tokens(c) for c in contents)
            digest = body_hash(body)
            self.stats.started += 1  # from here on a real provider bills the call, answered or not
            self.stats.started_by_hash[digest] += 1
            if tok_w is not None:
                # Charge what was used, not the max_tokens reserved (as OpenAI settles after the call).
                tok_w.level = min(tok_w.capacity, tok_w.level + cost - prompt_tokens - completion_tokens)
            if streamed:
                return await self._stream(request, body, model, contents, finishes, top, digest, prompt_tokens,
                                          completion_tokens, limit_headers, stall=fault == "stall")
        await self._latency()
        if fault is not None and fault != "stall":
            self.stats.faults[fault] += 1
            if fault == "429":
                return _error(429, "Rate limit reached. Please try again later.", "requests", "rate_limit_exceeded",
                              {"retry-after": f"{cfg.fault_retry_after:g}", **limit_headers})
            if fault == "500":
                return _error(500, "The server had an error while processing your request.", "server_error", None)
            if fault == "503":
                return _error(503, "The server is overloaded.", "server_error", None,
                              {"retry-after": f"{cfg.fault_retry_after:g}"})
            if fault == "hang":
                await self._hang(request)
                return web.Response(status=599)
            if fault == "reset":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=599)
            return web.Response(status=200, body=b'{"id": "chatcmpl-broken", "choices": [{"mess',
                                content_type="application/json")
        await self._generate(completion_tokens)
        if fault == "stall":  # not streamed: a stall is a hang after the generation began
            self.stats.faults["stall"] += 1
            await self._hang(request)
            return web.Response(status=599)
        payload = {
            "id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "fp_asyncraft_sim",
            "choices": [{"index": i, "message": {"role": "assistant", "content": c, "refusal": None},
                         "logprobs": _logprobs(c, top), "finish_reason": f}
                        for i, (c, f) in enumerate(zip(contents, finishes, strict=True))],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
        self._pay(digest, prompt_tokens, completion_tokens)
        return web.Response(status=200, body=orjson.dumps(payload), content_type="application/json",
                            headers={**limit_headers, "x-request-id": f"req_{digest}"})

    def _unknown_model(self, model: str) -> web.Response | None:
        known = [m.strip() for m in self.config.models.split(",") if m.strip()]
        if not known or model in known:
            return None
        if self.config.unknown_model_status == 400:  # LiteLLM's proxy
            return _error(400, f"Invalid model name passed in model={model}. Call `/v1/models` to view available "
                          "models for your key.", "invalid_request_error", "400")
        return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                      "invalid_request_error", "model_not_found")

    async def _generate(self, tokens: int) -> None:
        if self.config.token_ms > 0 and tokens:
            await asyncio.sleep(tokens * self.config.token_ms / 1000.0)

    def _pay(self, digest: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.stats.paid += 1
        self.stats.paid_by_hash[digest] += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens

    async def _stream(self, request: web.Request, body: dict[str, Any], model: str, contents: list[str],
                      finishes: list[str], top: int | None, digest: str, prompt_tokens: int, completion_tokens: int,
                      headers: dict[str, str], *, stall: bool = False) -> web.StreamResponse:
        """Headers at once (a real server accepts a streamed call before it generates), the first chunk
        after the latency, then a chunk per word, each after its tokens' time. Several choices (``n``) are
        sent one after the other, each chunk naming its choice's index."""
        resp = web.StreamResponse(status=200, headers={**headers, "Content-Type": "text/event-stream",
                                                       "x-request-id": f"req_{digest}"})
        await resp.prepare(request)
        self.stats.streamed += 1
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None, usage: dict[str, int] | None = None,
                  index: int = 0, logprobs: dict[str, Any] | None = None) -> bytes:
            obj: dict[str, Any] = {"id": f"chatcmpl-{digest}", "object": "chat.completion.chunk", "created": created,
                                   "model": model, "system_fingerprint": "fp_asyncraft_sim",
                                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish_reason}]}
            if usage is not None:
                obj["usage"] = usage
                obj["choices"] = []
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        # A content chunk is the same bytes around each word: built once, so that an instant model costs
        # the simulator little more streamed than not.
        before, after = chunk({"content": ""}, None).split(b'"content":""', 1)
        before += b'"content":'

        def content_chunk(word: str) -> bytes:
            return before + orjson.dumps(word) + after

        await self._latency()
        await resp.write(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        if stall:
            self.stats.faults["stall"] += 1
            await self._hang(request)
            return resp
        usage = []
        if (body.get("stream_options") or {}).get("include_usage"):
            usage.append(chunk({}, None, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}))
        end = b"data: [DONE]\n\n"
        if len(contents) > 1 or top is not None:
            for index, (content, finish) in enumerate(zip(contents, finishes, strict=True)):
                if index:
                    await resp.write(chunk({"role": "assistant", "content": ""}, None, index=index))
                for word in _words(content):
                    await self._generate(estimate_tokens(word))
                    entry = None if top is None else {"content": [simcontent.token_logprobs(word, top)],
                                                      "refusal": None}
                    await resp.write(chunk({"content": word}, None, index=index, logprobs=entry))
                await resp.write(chunk({}, finish, index=index))
            await resp.write(b"".join([*usage, end]))
        elif self.config.token_ms > 0:
            for word in _words(contents[0]):
                await self._generate(estimate_tokens(word))
                await resp.write(content_chunk(word))
            await resp.write(b"".join([chunk({}, finishes[0]), *usage, end]))
        else:  # an instant model: the whole answer at once
            await resp.write(b"".join([content_chunk(word) for word in _words(contents[0])]
                                      + [chunk({}, finishes[0]), *usage, end]))
        await resp.write_eof()
        self._pay(digest, prompt_tokens, completion_tokens)
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._embeddings_inner(request)
        finally:
            self.stats.in_flight -= 1

    async def _embeddings_inner(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        self.stats.embeddings += 1
        read = await self._read_json(request)
        if isinstance(read, web.Response):
            self.stats.by_status[str(read.status)] += 1
            return read
        body, _raw = read
        model = body.get("model") if isinstance(body, dict) else None
        unknown = self._unknown_model(model) if isinstance(model, str) and model else None
        if unknown is not None:
            self.stats.by_status[str(unknown.status)] += 1
            return unknown
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs) or not inputs:
            self.stats.by_status["400"] += 1
            return _error(400, "'input' must be a string or a list of strings", "invalid_request_error", None)
        fault = self._fault()
        await self._latency()
        if fault in ("429", "500", "503"):
            self.stats.faults[fault] += 1
            self.stats.by_status[fault] += 1
            return _error(int(fault), "injected fault", "server_error" if fault != "429" else "requests",
                          "rate_limit_exceeded" if fault == "429" else None,
                          {"retry-after": f"{self.config.fault_retry_after:g}"})
        dim = self.config.embedding_dim
        data = [{"object": "embedding", "index": i, "embedding": simcontent.embed(text, dim)}
                for i, text in enumerate(inputs)]
        tokens = sum(estimate_tokens(t) for t in inputs)
        digest = body_hash(body)
        self.stats.started += 1
        self.stats.started_by_hash[digest] += 1
        self._pay(digest, tokens, 0)
        self.stats.by_status["200"] += 1
        return web.json_response({"object": "list", "data": data, "model": body.get("model") or "sim-embed",
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                                 dumps=lambda o: orjson.dumps(o).decode(), headers={"x-request-id": f"req_{digest}"})

    async def _completions(self, request: web.Request) -> web.Response:
        """Legacy text completions (``prompt`` in, ``choices[].text`` out), never streamed; ``n`` choices."""
        self.stats.requests += 1
        resp = await self._completions_inner(request)
        self.stats.by_status[str(resp.status)] += 1
        return resp

    async def _completions_inner(self, request: web.Request) -> web.Response:
        read = await self._read_json(request)
        if isinstance(read, web.Response):
            return read
        body, raw = read
        prompt = body.get("prompt") if isinstance(body, dict) else None
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return _error(400, "'prompt' must be a string or a list of strings", "invalid_request_error", None)
        model = request.match_info.get("deployment") or body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", "invalid_request_error", None)
        unknown = self._unknown_model(model)
        if unknown is not None:
            return unknown
        refused = simcontent.BAD_REQUEST.search(raw.decode("utf-8", "replace"))
        if refused is not None:
            return _error(400, "Invalid 'prompt': this request is rejected on purpose (simulator marker).",
                          "invalid_request_error", "invalid_value")
        fault = self._fault()
        await self._latency()
        if fault in ("429", "500", "503"):
            self.stats.faults[fault] += 1
            return _error(int(fault), "injected fault", "server_error" if fault != "429" else "requests",
                          "rate_limit_exceeded" if fault == "429" else None,
                          {"retry-after": f"{self.config.fault_retry_after:g}"})
        n = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        max_tokens = body.get("max_tokens")
        choices: list[dict[str, Any]] = []
        for p in prompts:
            for i in range(n):
                text = simcontent.completion_reply(p) + (f" ({i + 1})" if i else "")
                finish = "stop"
                if isinstance(max_tokens, int) and max_tokens > 0 and estimate_tokens(text) > max_tokens:
                    text, finish = text[: max_tokens * 4], "length"
                choices.append({"text": text, "index": len(choices), "logprobs": None, "finish_reason": finish})
        prompt_tokens = sum(estimate_tokens(p) for p in prompts)
        completion_tokens = sum(estimate_tokens(c["text"]) for c in choices)
        await self._generate(completion_tokens)
        digest = body_hash(body)
        self.stats.started += 1
        self.stats.started_by_hash[digest] += 1
        self._pay(digest, prompt_tokens, completion_tokens)
        payload = {"id": f"cmpl-{digest}", "object": "text_completion", "created": int(time.time()), "model": model,
                   "system_fingerprint": "fp_asyncraft_sim", "choices": choices,
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}}
        return web.Response(status=200, body=orjson.dumps(payload), content_type="application/json",
                            headers={"x-request-id": f"req_{digest}"})

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        names = [m.strip() for m in self.config.models.split(",") if m.strip()]
        if not names:  # any model is served: no list could say so
            return _error(404, "This server serves any model name; it has no model list.", "invalid_request_error",
                          None)
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "asyncraft-simulator"} for n in names]})

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_dict()), content_type="application/json")

    async def _set_config(self, request: web.Request) -> web.Response:
        changes = orjson.loads(await request.read() or b"{}")
        names = {f.name for f in dataclasses.fields(SimConfig)} - {"host", "port"}
        unknown = set(changes) - names
        if unknown:
            return _error(400, f"unknown simulator settings: {sorted(unknown)}", "invalid_request_error", None)
        for k, v in changes.items():
            setattr(self.config, k, type(getattr(self.config, k))(v))
        return web.json_response(dataclasses.asdict(self.config))

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats = SimStats()
        self._limits_for = None
        self._rng = random.Random(self.config.seed)  # the same faults and latencies again, for fair comparisons
        return web.json_response({"ok": True})


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(SimConfig):
        default = f.default
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(default),
                            default=argparse.SUPPRESS, metavar=type(default).__name__.upper(),
                            help=f"{_HELP[f.name]} [env {env}; default {default if default != '' else 'empty'}]")


def config_from(ns: argparse.Namespace, env: dict[str, str] | None = None) -> SimConfig:
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SimConfig):
        kind: Callable[[str], Any] = type(f.default)
        if hasattr(ns, f.name):
            values[f.name] = getattr(ns, f.name)
        elif ENV_PREFIX + f.name.upper() in env:
            raw = env[ENV_PREFIX + f.name.upper()]
            try:
                values[f.name] = kind(raw)
            except ValueError:
                raise SystemExit(f"asyncraft simulate: error: {ENV_PREFIX + f.name.upper()} must be "
                                 f"{kind.__name__} (got {raw!r})") from None
    cfg = SimConfig(**values)
    if cfg.latency_dist not in ("fixed", "uniform", "lognormal", "exponential"):
        raise SystemExit("asyncraft simulate: error: --latency-dist must be fixed, uniform, lognormal or exponential")
    if cfg.limit_headers not in ("openai", "litellm", "none"):
        raise SystemExit("asyncraft simulate: error: --limit-headers must be openai, litellm or none")
    if cfg.stream_mode not in ("sse", "json", "refuse"):
        raise SystemExit("asyncraft simulate: error: --stream-mode must be sse, json or refuse")
    if cfg.unknown_model_status not in (400, 404):
        raise SystemExit("asyncraft simulate: error: --unknown-model-status must be 400 or 404")
    probs = [cfg.p_429, cfg.p_500, cfg.p_503, cfg.p_hang, cfg.p_stall, cfg.p_reset, cfg.p_malformed]
    if any(p < 0 for p in probs) or sum(probs) > 1:
        raise SystemExit("asyncraft simulate: error: fault probabilities must be >= 0 and add up to at most 1")
    return cfg


async def serve(cfg: SimConfig) -> None:
    async with Simulator(cfg) as sim:
        print(f"asyncraft simulate: listening on {sim.base_url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(ns: argparse.Namespace) -> int:
    cfg = config_from(ns)
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"asyncraft simulate: error: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
