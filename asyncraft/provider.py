"""OpenAI-compatible chat-completions client on one aiohttp session. No retries here.

Every HTTP or network failure leaves this module as one of the ``ProviderError`` subclasses;
``retry.classify`` decides what to do with it. Works with OpenAI, Azure OpenAI (``api-key``
header, ``api-version``), vLLM, Ollama, llama.cpp and LiteLLM.

Chat calls are streamed (``stream: true`` with ``stream_options.include_usage``) and the chunks
are assembled into exactly the body a non-streamed call returns, so a slow answer shows progress
byte by byte. aiohttp's read timeout turns that into the stall rule: a streamed call is ended when
no byte arrives for ``stall_timeout``. A call that is not streamed sends nothing until its answer is
complete, so it is bounded by ``request_timeout`` alone. A server that answers a streamed request
with plain JSON, or refuses it, is asked without streaming from then on.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from asyncraft import __version__
from asyncraft.errors import (
    AuthError,
    BadRequest,
    BadResponse,
    ConnectionFailed,
    NotFound,
    ProviderError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    ServerError,
    Unreachable,
)
from asyncraft.records import scrub

log = logging.getLogger("asyncraft.provider")

MAX_MESSAGE = 500  # characters of a server's error message kept in errors and logs
MAX_ERROR_BODY = 64 << 10  # bytes of an error response kept with a failed task (an error page can be large)
_STREAMING = {"stream": True, "stream_options": {"include_usage": True}}


@dataclass(slots=True)
class Completion:
    message: dict[str, Any]
    finish_reason: str | None
    usage: dict[str, int] | None
    model: str | None
    raw: dict[str, Any] | None = None  # the whole response body (streamed: assembled as the non-streamed body)
    request_id: str | None = None  # the server's x-request-id, which its support asks for


@dataclass(slots=True)
class RateInfo:
    """What the server said about its limits (x-ratelimit-* headers); None where absent."""

    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None

    def used_up(self) -> float | None:
        """Seconds until the server's limit allows calls again, when it says the limit is used up."""
        waits = [reset for remaining, reset in ((self.remaining_requests, self.reset_requests),
                                                (self.remaining_tokens, self.reset_tokens))
                 if remaining is not None and remaining <= 0 and reset]
        return max(waits) if waits else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
# OpenAI and Azure: x-ratelimit-remaining-requests; LiteLLM adds a scope: x-ratelimit-api_key-remaining-requests.
_RATE_HEADER = re.compile(r"x-ratelimit-(?:([a-z0-9_]+)-)?(limit|remaining|reset)-(requests|tokens)$", re.IGNORECASE)
_EPOCH = 1e9  # a "reset" this large is a Unix time, not a duration


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset format: "1s", "6m0s", "120ms", "1h2m3.5s"; a bare number is seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    total = 0.0
    matched = False
    for num, unit in _DURATION.findall(value):
        matched = True
        total += float(num) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return total if matched else None


def parse_retry_after(headers: Any) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_rate_info(headers: Any) -> RateInfo | None:
    found: dict[str, float] = {}
    for name, value in headers.items():
        if name[:12].lower() != "x-ratelimit-":
            continue
        m = _RATE_HEADER.match(name)
        if m is None:
            continue
        what, kind = m.group(2).lower(), m.group(3).lower()
        if what == "reset":
            number = parse_duration(value)
            if number is not None and number > _EPOCH:
                number = max(0.0, number - time.time())
        else:
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None:
            continue
        key = f"{what}_{kind}"
        # Several scopes at once (LiteLLM: key, team, user): the tightest limit binds, the latest reset counts.
        old = found.get(key)
        found[key] = number if old is None else (max(old, number) if what == "reset" else min(old, number))
    return RateInfo(**found) if found else None


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """A server's text as one short line: an HTML error page must not break a log line."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def join_url(base: URL, path: str) -> URL:
    """``base`` + ``path``, keeping the base's query string (a gateway token, say) on every request."""
    return base.with_path(base.path.rstrip("/") + path).with_query(base.query)


class Provider:
    """One endpoint. Constructors do no I/O; ``async with`` opens the session."""

    def __init__(self, base_url: str, *, api_key: str | None, api_type: str = "openai",
                 api_version: str | None = None, concurrency: int = 64, request_timeout: float | None = 600.0,
                 connect_timeout: float = 10.0, stall_timeout: float = 120.0, stream: bool = True,
                 on_rate_info: Callable[[RateInfo], None] | None = None,
                 on_status: Callable[[int], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        base = URL(self.base_url)
        # What messages show: a URL may carry credentials (https://user:pass@host, ?token=...), which must
        # not reach a log line or errors.jsonl.
        self.shown_url = str(base.with_user(None).with_query(None))
        # Parsed once: aiohttp would parse a string URL again for every request.
        self._urls = {path: join_url(base, path) for path in ("/chat/completions", "/completions", "/embeddings",
                                                              "/models")}
        self._key = api_key
        self._azure = api_type == "azure"
        self._params = {"api-version": api_version} if self._azure and api_version else None
        self._concurrency = concurrency
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout
        # Nothing arrives before a non-streamed answer is complete: only the whole-call limit applies.
        self._plain = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self._streamed = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout,
                                               sock_read=stall_timeout)
        # True once the server has answered a call as a stream; False when it cannot stream (or the
        # user said so); None until the first answer. Until then the stall timer is not armed: a slow
        # server that turns out not to stream must not have its whole first wave cancelled and paid again.
        self.streams: bool | None = None if stream else False
        self._on_rate_info = on_rate_info
        # Sees each answer's status as soon as its headers arrive: for a streamed call, long before the
        # answer is complete.
        self._on_status = on_status
        self._session: aiohttp.ClientSession | None = None
        headers = {"Content-Type": "application/json", "User-Agent": f"asyncraft/{__version__}"}
        if api_key:
            if self._azure:
                headers["api-key"] = api_key
            else:
                headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers

    async def __aenter__(self) -> Provider:
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=0, ttl_dns_cache=300,
                                         enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- calls -----------------------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> Completion:
        if self.streams is not False:
            try:
                return _completion(*await self._chat_streamed(body))
            except BadRequest as exc:
                # A server that has streamed before means something else by a 400 that mentions streams.
                if self.streams or "stream" not in str(exc).rsplit(": ", 1)[-1].lower():
                    raise
                # A 400 is not billed: the same call goes again, plainly.
                self._stop_streaming(f"it refuses streamed requests ({exc})")
        return _completion(*await self._post("/chat/completions", body))

    async def complete(self, body: dict[str, Any]) -> Completion:
        """A legacy completions call (``/completions``, never streamed): the first choice's ``text`` is the
        message's content."""
        raw, request_id = await self._post("/completions", body)
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BadResponse("response has no choices")
        return Completion({"content": choices[0].get("text")}, choices[0].get("finish_reason"), _usage(raw),
                          raw.get("model"), raw, request_id)

    async def embed(self, body: dict[str, Any]) -> Completion:
        """An embeddings call in the shape of every other result: ``message["embeddings"]`` holds the
        vectors in input order, ``usage`` the tokens billed (prompt only)."""
        raw, request_id = await self._post("/embeddings", body)
        data = raw.get("data")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise BadResponse("embeddings response has no data")
        ordered = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
        vectors = [d.get("embedding") for d in ordered]
        # A list of floats, or a base64 string when the request asks for encoding_format "base64".
        if not all(isinstance(v, list | str) for v in vectors):
            raise BadResponse("embeddings response holds an item without an embedding vector")
        usage = raw.get("usage") if isinstance(raw.get("usage"), dict) else None
        if usage is not None:
            usage = {"prompt_tokens": int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0),
                     "completion_tokens": 0}
        return Completion({"embeddings": vectors}, None, usage, raw.get("model"), raw, request_id)

    async def models(self) -> list[str] | None:
        """The model ids ``GET /models`` lists, or None where the server has no such list. Free of charge."""
        session = self._require_session()
        try:
            async with session.get(self._urls["/models"], params=self._params, timeout=self._plain) as resp:
                data = await resp.read()
                if resp.status in (401, 403, 429) or resp.status >= 500:
                    raise self._error(resp.status, data, resp.headers)
                if resp.status != 200:
                    return None
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise self._translate(exc) from None
        try:
            listing = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        items = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(items, list):
            return None
        return [str(m["id"]) for m in items if isinstance(m, dict) and m.get("id")]

    async def _chat_streamed(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        session = self._require_session()
        payload = orjson.dumps({**body, **_STREAMING})
        timeout = self._streamed if self.streams else self._plain
        try:
            async with session.post(self._urls["/chat/completions"], data=payload, params=self._params,
                                    timeout=timeout) as resp:
                info = self._rate_info(resp.headers)
                if self._on_status is not None:
                    self._on_status(resp.status)
                if resp.status != 200:
                    raise self._error(resp.status, await resp.read(), resp.headers, info)
                request_id = resp.headers.get("x-request-id")
                if resp.content_type != "text/event-stream":
                    raw = _json_object(await resp.read())
                    self._stop_streaming("it answers streamed requests with plain JSON")
                    return raw, request_id
                if not self.streams:
                    self.streams = True
                # Read whole: aiohttp's read timeout restarts with every byte received all the same.
                assembly = StreamAssembly()
                assembly.feed(await resp.read())
                return assembly.body(), request_id
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise self._translate(exc) from None

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        session = self._require_session()
        try:
            async with session.post(self._urls[path], data=orjson.dumps(body), params=self._params,
                                    timeout=self._plain) as resp:
                if self._on_status is not None:
                    self._on_status(resp.status)
                data = await resp.read()
                status, headers = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            raise self._translate(exc) from None
        info = self._rate_info(headers)
        if status != 200:
            raise self._error(status, data, headers, info)
        return _json_object(data), headers.get("x-request-id")

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Provider used outside 'async with'")
        return self._session

    def _stop_streaming(self, why: str) -> None:
        if self.streams is not False:
            self.streams = False
            log.warning("%s does not stream: %s; calls are sent unstreamed from now on, so a slow call is "
                        "bounded by ASYNCRAFT_REQUEST_TIMEOUT only", self.shown_url, why)

    def _rate_info(self, headers: Any) -> RateInfo | None:
        if self._on_rate_info is None:
            return None
        info = parse_rate_info(headers)
        if info is not None:
            self._on_rate_info(info)
        return info

    # -- errors ----------------------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        return one_line(scrub(text.replace(self.base_url, self.shown_url), self._key))

    def _translate(self, exc: BaseException) -> ProviderError:
        """aiohttp's and the OS's errors as ours, at this boundary only."""
        url = self.shown_url
        if isinstance(exc, aiohttp.SocketTimeoutError):
            return ProviderTimeout(f"call stalled: no byte from {url} for {self._stall_timeout:g}s "
                                   "(ASYNCRAFT_STALL_TIMEOUT)")
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return Unreachable(f"cannot connect to {url}: no connection within {self._connect_timeout:g}s "
                               "(ASYNCRAFT_CONNECT_TIMEOUT)")
        if isinstance(exc, TimeoutError):
            return ProviderTimeout(f"no complete answer from {url} within ASYNCRAFT_REQUEST_TIMEOUT="
                                   f"{self._request_timeout}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return Unreachable(f"cannot connect to {url}: {self._clean(_os_reason(exc.os_error))}")
        return ConnectionFailed(f"connection to {url} failed: {type(exc).__name__}: {self._clean(str(exc))}")

    def _error(self, status: int, data: bytes, headers: Any, info: RateInfo | None = None) -> ProviderError:
        message, code, etype = "", None, None
        sent = scrub(data[:MAX_ERROR_BODY].decode("utf-8", "replace"), self._key)
        try:
            body: Any = orjson.loads(sent)
        except orjson.JSONDecodeError:
            body = sent  # an HTML error page, say: kept as the text it is
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or "")
            code = err.get("code")
            etype = err.get("type")
        elif isinstance(err, str):
            message = err
        elif not isinstance(body, dict):
            message = sent[:MAX_MESSAGE]
        code = str(code) if code is not None else None
        etype = str(etype) if etype is not None else None
        message = self._clean(message)
        text = f"HTTP {status} from {self.shown_url}" + (f" [{code}]" if code else "") + (
            f": {message}" if message else "")
        kw: dict[str, Any] = {"status": status, "code": code, "type": etype,
                              "retry_after": parse_retry_after(headers), "rate_info": info, "body": body,
                              "request_id": headers.get("x-request-id")}
        if status == 429:
            if code == "insufficient_quota" or etype == "insufficient_quota":
                return QuotaExhausted(text, **kw)
            return RateLimited(text, **kw)
        if status in (401, 403):
            return AuthError(text, **kw)
        if status == 404:
            return NotFound(text, **kw)
        if status == 408:
            return ProviderTimeout(text, **kw)
        if status == 409 or status >= 500:
            return ServerError(text, **kw)
        return BadRequest(text, **kw)


def _os_reason(err: OSError) -> str:
    """"Connection refused", "Name or service not known": the OS's words, not asyncio's wrapping."""
    if isinstance(err, socket.gaierror) or not err.errno:
        return err.strerror or str(err)
    return os.strerror(err.errno)


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadResponse(f"malformed JSON in a 200 response ({len(data)} bytes)", status=200) from None
    if not isinstance(raw, dict):
        raise BadResponse("response body is not a JSON object", status=200)
    return raw


def _usage(raw: dict[str, Any]) -> dict[str, int] | None:
    usage = raw.get("usage")
    if not isinstance(usage, dict):
        return None
    return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


def _completion(raw: dict[str, Any], request_id: str | None = None) -> Completion:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse("response has no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise BadResponse("response choice has no message")
    out: dict[str, Any] = {"content": message.get("content")}
    for key in ("tool_calls", "refusal", "reasoning_content", "reasoning"):
        if message.get(key):
            out[key] = message[key]
    return Completion(out, choice.get("finish_reason"), _usage(raw), raw.get("model"), raw, request_id)


class StreamAssembly:
    """Server-sent chat-completion chunks in, the non-streamed response body out.

    ``feed`` takes bytes as they arrive (events may be split anywhere); ``body`` gives the body a
    non-streamed call would have returned: content, refusal and reasoning text concatenated, tool calls
    merged by index, logprobs appended, the last finish_reason, the usage of the final chunk.
    """

    __slots__ = ("_pending", "_head", "_choices", "_usage", "done")

    def __init__(self) -> None:
        self._pending = b""
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self.done = False  # [DONE] seen

    def feed(self, block: bytes) -> None:
        if self._pending:
            block = self._pending + block
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = block.split(b"\n\n")
        self._pending = events.pop()
        payloads = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:  # the common case: one data line
                data = event[6:]
            else:
                lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
                if not lines:
                    continue  # a comment (": keep-alive") or an event without data
                data = b"\n".join(lines)
            if data[:1] != b"{" and data.strip() == b"[DONE]":
                self.done = True
            else:
                payloads.append(data)
        if not payloads:
            return
        # One parse for all the chunks that arrived together, not one per chunk.
        try:
            chunks = orjson.loads(b"[" + b",".join(payloads) + b"]")
        except orjson.JSONDecodeError:
            raise BadResponse(f"malformed JSON in a streamed chunk ({sum(map(len, payloads))} bytes)",
                              status=200) from None
        for chunk in chunks:
            self._chunk(chunk)

    def body(self) -> dict[str, Any]:
        """The assembled body; raises if the stream ended before the answer was complete."""
        pending, self._pending = self._pending, b""
        if pending.strip():
            # The last event may lack its blank line ("data: [DONE]\n" then the end); a torn one is dropped.
            with contextlib.suppress(BadResponse):
                self.feed(pending.rstrip(b"\r\n") + b"\n\n")
        complete = bool(self._choices) and all(c.finish_reason is not None for c in self._choices.values())
        if not (self.done or complete):
            raise ConnectionFailed("the stream ended before the answer was complete")
        out: dict[str, Any] = {**self._head, "object": "chat.completion",
                               "choices": [self._choices[i].as_dict() for i in sorted(self._choices)]}
        if self._usage is not None:
            out["usage"] = self._usage
        return out

    def _chunk(self, chunk: Any) -> None:
        if type(chunk) is not dict:
            raise BadResponse("a streamed chunk is not a JSON object", status=200)
        if "error" in chunk:
            raise _stream_error(chunk["error"])
        # Every chunk repeats id, created, model...: the last one's word stands, as in a non-streamed body.
        choices = chunk.pop("choices", None)
        usage = chunk.pop("usage", None)
        chunk.pop("object", None)
        self._head.update(chunk)
        if usage is not None:
            self._usage = usage
        if type(choices) is not list:
            return
        if len(choices) == 1:
            # Most chunks carry one more piece of content of a choice already begun: the short way.
            choice = choices[0]
            delta = choice.get("delta") if type(choice) is dict else None
            if (type(delta) is dict and len(delta) == 1 and choice.get("finish_reason") is None
                    and choice.get("logprobs") is None):
                state = self._choices.get(choice.get("index", 0))
                pieces = state.texts.get("content") if state is not None else None
                content = delta.get("content")
                if pieces is not None and type(content) is str:
                    pieces.append(content)
                    return
        for choice in choices:
            if type(choice) is dict:
                self._choice(choice)

    def _choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        state = self._choices.get(index) if type(index) is int else self._choices.get(index := 0)
        if state is None:
            state = self._choices[index] = _Choice(index)
        delta = choice.get("delta")
        if type(delta) is dict:
            state.merge(delta)
        finish = choice.get("finish_reason")
        if finish is not None:
            state.finish_reason = finish
        logprobs = choice.get("logprobs")
        if type(logprobs) is dict:
            state.add_logprobs(logprobs)


class _Choice:
    __slots__ = ("index", "message", "texts", "calls", "logprobs", "finish_reason")

    def __init__(self, index: int) -> None:
        self.index = index
        self.message: dict[str, Any] = {}
        self.texts: dict[str, list[str]] = {}  # content, refusal, reasoning_content: text in pieces, joined at the end
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None

    def merge(self, delta: dict[str, Any]) -> None:
        message = self.message
        for key, value in delta.items():
            if type(value) is str and key != "role":
                pieces = self.texts.get(key)
                if pieces is None:
                    self.texts[key] = [value]
                    message[key] = None  # keeps the key's place
                else:
                    pieces.append(value)
            elif value is None:
                message.setdefault(key, None)
            elif key == "tool_calls":
                if type(value) is list:
                    for position, call in enumerate(value):
                        if type(call) is dict:
                            self._merge_call(position, call)
            elif key == "function_call" and type(value) is dict:  # the legacy single call
                message[key] = _merge_function(message.get(key) or {}, value)
            else:
                message[key] = value

    def _merge_call(self, position: int, delta: dict[str, Any]) -> None:
        index = delta.get("index", position)
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = {}
        for key, value in delta.items():
            if key == "index":
                continue
            if key == "function" and isinstance(value, dict):
                call[key] = _merge_function(call.get(key) or {}, value)
            elif value not in (None, ""):
                call[key] = value  # id and type: sent once, or repeated whole by some servers

    def add_logprobs(self, delta: dict[str, Any]) -> None:
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in delta.items():
            if isinstance(value, list):
                self.logprobs.setdefault(key, [])
                if self.logprobs[key] is None:
                    self.logprobs[key] = []
                self.logprobs[key].extend(value)
            else:
                self.logprobs.setdefault(key, value)

    def as_dict(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": None, **self.message}
        for key, pieces in self.texts.items():
            message[key] = "".join(pieces)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {"index": self.index, "message": message, "logprobs": self.logprobs,
                "finish_reason": self.finish_reason}


def _merge_function(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    for key, value in delta.items():
        if key == "arguments" and isinstance(value, str):
            acc[key] = (acc.get(key) or "") + value
        elif value not in (None, ""):
            acc[key] = value  # the name: sent once, or repeated whole
    return acc


def _stream_error(err: Any) -> ProviderError:
    """An error event in the middle of a stream (vLLM, OpenRouter): the server gave up on this answer."""
    if not isinstance(err, dict):
        return ServerError(f"the server ended the stream with an error: {one_line(str(err))}", status=200,
                           body={"error": err})
    message = one_line(str(err.get("message") or ""))
    code = err.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else None
    text = f"the server ended the stream with an error{f' {code}' if code is not None else ''}: {message}"
    if status is not None and 400 <= status < 500 and status not in (408, 409, 429):
        return BadRequest(text, status=status, body={"error": err})
    return ServerError(text, status=status, body={"error": err})
