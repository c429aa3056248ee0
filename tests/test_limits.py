"""Pure parts of limits, retries, provider error mapping and budgets."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from multidict import CIMultiDict

from asyncraft.cost import Budget
from asyncraft.errors import AuthError, BadRequest, NotFound, QuotaExhausted, RateLimited, ServerError
from asyncraft.limits import Limits, estimate_request_tokens, paced_limiter
from asyncraft.provider import Provider, RateInfo, parse_duration, parse_rate_info, parse_retry_after
from asyncraft.retry import Action, backoff, classify


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("6m0s", 360.0), ("120ms", 0.12), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("", None), ("soon", None),
])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_retry_after_prefers_milliseconds_and_reads_dates() -> None:
    assert parse_retry_after(CIMultiDict({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert parse_retry_after(CIMultiDict({"Retry-After": "3"})) == 3.0
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (parse_retry_after(CIMultiDict({"retry-after": later})) or 0) <= 30
    assert parse_retry_after(CIMultiDict()) is None


def test_rate_info_from_openai_headers() -> None:
    info = parse_rate_info(CIMultiDict({
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "2900", "x-ratelimit-reset-tokens": "6m0s"}))
    assert info == RateInfo(500, 0, 0.12, 30000, 2900, 360)
    assert parse_rate_info(CIMultiDict({"content-type": "application/json"})) is None


@pytest.mark.parametrize(("status", "body", "kind", "action"), [
    (429, b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}',
     RateLimited, Action.RETRY),
    (429, b'{"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}',
     QuotaExhausted, Action.FATAL),
    (401, b'{"error": {"message": "Incorrect API key provided: secret-test-key-xyz"}}', AuthError, Action.FATAL),
    (404, b'{"error": {"message": "no model", "code": "model_not_found"}}', NotFound, Action.FATAL),
    (400, b'{"error": {"message": "bad"}}', BadRequest, Action.FAIL_TASK),
    (503, b"<html>upstream down</html>", ServerError, Action.RETRY),
])
def test_http_errors_map_to_one_exception_tree(status: int, body: bytes, kind: type, action: Action) -> None:
    provider = Provider("http://127.0.0.1:1/v1", api_key="secret-test-key-xyz")
    exc = provider._error(status, body, CIMultiDict({"retry-after": "2"}))
    assert type(exc) is kind and exc.status == status and exc.retry_after == 2.0
    assert classify(exc) is action
    assert "secret-test-key-xyz" not in str(exc)


def test_azure_uses_the_api_key_header_and_api_version() -> None:
    p = Provider("https://x.openai.azure.com/openai/deployments/d", api_key="k", api_type="azure",
                 api_version="2024-10-21")
    assert p._headers["api-key"] == "k" and "Authorization" not in p._headers
    assert p._params == {"api-version": "2024-10-21"}
    assert Provider("http://127.0.0.1/v1", api_key="k")._headers["Authorization"] == "Bearer k"


def test_backoff_is_exponential_with_full_jitter_capped_and_honours_retry_after() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        for _ in range(50):
            d = backoff(attempt, base=0.5, cap=8.0, rng=rng)
            assert 0 <= d <= min(8.0, 0.5 * 2 ** (attempt - 1))
    assert backoff(1, base=0.5, cap=8.0, retry_after=20.0, rng=rng) == 20.0
    top = max(backoff(4, base=1.0, cap=100.0, rng=rng) for _ in range(200))
    assert top > 6.0  # jitter spans the whole range up to 2**3


def test_token_estimate_counts_prompt_and_reserved_output() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_request_tokens(body, 256) == 100 + 4 + 50
    assert estimate_request_tokens({"messages": [{"role": "user", "content": "abcd"}]}, 256) == 1 + 4 + 256


async def test_one_429_pauses_every_worker() -> None:
    limits = Limits(rng=random.Random(0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    limits.cooldown(0.2)
    assert limits.cooling_down()
    finished = await asyncio.gather(*(_acquire_at(limits) for _ in range(5)))
    assert all(t - start >= 0.2 for t in finished)
    assert limits.cooldowns == 1


async def _acquire_at(limits: Limits) -> float:
    await limits.acquire(1)
    return asyncio.get_running_loop().time()


def test_a_lower_server_limit_is_adopted_and_an_empty_quota_pauses() -> None:
    async def body() -> None:
        limits = Limits(rpm=6000)
        limits.observe(RateInfo(limit_requests=600, remaining_requests=0, reset_requests=0.5))
        assert limits.rpm == 600 and limits.cooling_down()
        limits.observe(RateInfo(limit_requests=9000))
        assert limits.rpm == 600  # never raised above what is known

    asyncio.run(body())


def test_paced_limiter_holds_one_second_of_requests() -> None:
    lim = paced_limiter(1200)
    assert lim.max_rate == 20 and lim.time_period == 1.0
    tiny = paced_limiter(30)  # below one per second: a burst of one, spaced 2 s apart
    assert tiny.max_rate == 1 and tiny.time_period == 2.0


def test_budget_caps() -> None:
    b = Budget(price_input_per_m=2.0, price_output_per_m=8.0, max_cost=1.0)
    assert b.cost(250_000, 50_000) == pytest.approx(0.9)
    assert b.exceeded(250_000, 50_000) is None
    assert "cost budget reached" in (b.exceeded(250_000, 62_500) or "")
    assert "token budget" in (Budget(max_tokens=100).exceeded(60, 40) or "")
    assert Budget().exceeded(10**9, 10**9) is None


def test_credentials_in_the_base_url_stay_out_of_error_messages() -> None:
    provider = Provider("https://user:s3cret-pass@llm.internal:8443/v1", api_key="k")
    exc = provider._error(500, b'{"error": {"message": "boom"}}', CIMultiDict())
    assert "s3cret-pass" not in str(exc) and "user@" not in str(exc)
    assert "https://llm.internal:8443/v1" in str(exc)
    assert "s3cret-pass" not in provider._clean("Cannot connect to https://user:s3cret-pass@llm.internal:8443/v1/x")
