"""OpenAI-compatible chat-completions client on one aiohttp session. No retries here.

Every HTTP or network failure leaves this module as one of the ``ProviderError`` subclasses;
``retry.classify`` decides what to do with it. Works with OpenAI, Azure OpenAI (``api-key``
header, ``api-version``), vLLM, Ollama and llama.cpp.
"""

from __future__ import annotations

import email.utils
import re
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
)
from asyncraft.records import scrub


@dataclass(slots=True)
class Completion:
    message: dict[str, Any]
    finish_reason: str | None
    usage: dict[str, int] | None
    model: str | None


@dataclass(slots=True)
class RateInfo:
    """What the server said about its limits (x-ratelimit-* headers); None where absent."""

    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests: float | None = None
    limit_tokens: float | None = None
    remaining_tokens: float | None = None
    reset_tokens: float | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


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
    with_date = email.utils.parsedate_to_datetime(value) if value else None
    if with_date is None:
        return None
    return max(0.0, with_date.timestamp() - time.time())


def parse_rate_info(headers: Any) -> RateInfo | None:
    if "x-ratelimit-limit-requests" not in headers and "x-ratelimit-limit-tokens" not in headers:
        return None

    def num(name: str) -> float | None:
        try:
            return float(headers[name])
        except (KeyError, ValueError):
            return None

    return RateInfo(
        num("x-ratelimit-limit-requests"), num("x-ratelimit-remaining-requests"),
        parse_duration(headers.get("x-ratelimit-reset-requests")),
        num("x-ratelimit-limit-tokens"), num("x-ratelimit-remaining-tokens"),
        parse_duration(headers.get("x-ratelimit-reset-tokens")),
    )


class Provider:
    """One endpoint. Constructors do no I/O; ``async with`` opens the session."""

    def __init__(self, base_url: str, *, api_key: str | None, api_type: str = "openai",
                 api_version: str | None = None, concurrency: int = 64, request_timeout: float | None = 600.0,
                 connect_timeout: float = 10.0, on_rate_info: Callable[[RateInfo], None] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # What messages show: a URL may carry credentials (https://user:pass@host), which must not
        # reach a log line or errors.jsonl.
        self.shown_url = str(URL(self.base_url).with_user(None).with_query(None))
        # Parsed once: aiohttp would parse a string URL again for every request.
        self._urls = {path: URL(self.base_url + path) for path in ("/chat/completions", "/embeddings")}
        self._key = api_key
        self._azure = api_type == "azure"
        self._params = {"api-version": api_version} if self._azure and api_version else None
        self._concurrency = concurrency
        # ``request_timeout=None`` leaves the whole-call timeout to the caller (the scheduler's watchdog):
        # aiohttp then arms no timer per request, which is a tenth of a call's CPU against a fast server.
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self._on_rate_info = on_rate_info
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
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers, timeout=self._timeout,
                                              json_serialize=lambda o: orjson.dumps(o).decode())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def chat(self, body: dict[str, Any], beat: Callable[[], None] | None = None) -> Completion:
        raw = await self._post("/chat/completions", body, beat)
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BadResponse("response has no choices")
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise BadResponse("response choice has no message")
        out: dict[str, Any] = {"content": message.get("content")}
        if message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        usage = raw.get("usage") if isinstance(raw.get("usage"), dict) else None
        if usage is not None:
            usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
        return Completion(out, choice.get("finish_reason"), usage, raw.get("model"))

    async def embed(self, body: dict[str, Any], beat: Callable[[], None] | None = None) -> Completion:
        """An embeddings call in the shape of every other result: ``message["embeddings"]`` holds the
        vectors in input order, ``usage`` the tokens billed (prompt only)."""
        raw = await self._post("/embeddings", body, beat)
        data = raw.get("data")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise BadResponse("embeddings response has no data")
        ordered = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0)
        vectors = [d.get("embedding") for d in ordered]
        if not all(isinstance(v, list) for v in vectors):
            raise BadResponse("embeddings response holds an item without an embedding vector")
        usage = raw.get("usage") if isinstance(raw.get("usage"), dict) else None
        if usage is not None:
            usage = {"prompt_tokens": int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0),
                     "completion_tokens": 0}
        return Completion({"embeddings": vectors}, None, usage, raw.get("model"))

    async def _post(self, path: str, body: dict[str, Any], beat: Callable[[], None] | None) -> dict[str, Any]:
        session = self._session
        if session is None:
            raise RuntimeError("Provider used outside 'async with'")
        url = self._urls[path]
        try:
            async with session.post(url, data=orjson.dumps(body), params=self._params) as resp:
                # Heartbeats at the headers and at the end of the body: a non-streamed answer is
                # sent in one go once generated, so a body that stops arriving is a stalled call.
                if beat is not None:
                    beat()
                data = await resp.read()
                if beat is not None:
                    beat()
                status = resp.status
                headers = resp.headers
        except TimeoutError:
            raise ProviderTimeout(f"no complete answer from {self.shown_url} within the timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionFailed(f"cannot connect to {self.shown_url}: {exc.os_error}") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            detail = self._clean(str(exc))
            raise ConnectionFailed(f"connection to {self.shown_url} failed: {type(exc).__name__}: {detail}") from None
        if self._on_rate_info is not None:
            info = parse_rate_info(headers)
            if info is not None:
                self._on_rate_info(info)
        if status != 200:
            raise self._error(status, data, headers)
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BadResponse(f"malformed JSON in a 200 response ({len(data)} bytes)", status=status) from None
        if not isinstance(raw, dict):
            raise BadResponse("response body is not a JSON object", status=status)
        return raw

    def _clean(self, text: str) -> str:
        return scrub(text.replace(self.base_url, self.shown_url), self._key)

    def _error(self, status: int, data: bytes, headers: Any) -> ProviderError:
        message, code, etype = "", None, None
        try:
            err = orjson.loads(data).get("error")
            if isinstance(err, dict):
                message = str(err.get("message") or "")
                code = err.get("code")
                etype = err.get("type")
            elif isinstance(err, str):
                message = err
        except (orjson.JSONDecodeError, AttributeError):
            message = data[:200].decode("utf-8", "replace")
        code = str(code) if code is not None else None
        etype = str(etype) if etype is not None else None
        message = scrub(message, self._key)
        text = f"HTTP {status} from {self.shown_url}" + (f" [{code}]" if code else "") + (
            f": {message}" if message else "")
        kw: dict[str, Any] = {"status": status, "code": code, "type": etype,
                              "retry_after": parse_retry_after(headers)}
        if status == 429:
            if code == "insufficient_quota" or etype == "insufficient_quota":
                return QuotaExhausted(text, **kw)
            return RateLimited(text, **kw)
        if status in (401, 403):
            return AuthError(text, **kw)
        if status == 404:
            return NotFound(text, **kw)
        if status in (408, 409) or status >= 500:
            return ServerError(text, **kw) if status != 408 else ProviderTimeout(text, **kw)
        return BadRequest(text, **kw)
