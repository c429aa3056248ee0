"""The rate controller on a fake clock, and the pure parts of retries, provider error mapping and budgets."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from multidict import CIMultiDict

from asyncraft.cost import Budget
from asyncraft.errors import AuthError, BadRequest, NotFound, QuotaExhausted, RateLimited, ServerError
from asyncraft.limits import MAX_SLACK, RateController, estimate_request_tokens
from asyncraft.provider import Provider, RateInfo, parse_duration, parse_rate_info, parse_retry_after
from asyncraft.retry import Action, backoff, backoff_cap, classify, failure_kind
from tests.ratemodel import BucketServer, FakeClock, ManualTime, run

# -- the controller: pacing ------------------------------------------------------------------------------


def starts(ctl: RateController, clock: FakeClock, n: int, tokens: int = 0) -> list[float]:
    """When ``n`` calls that each go as soon as they may would start."""
    out = []
    for _ in range(n):
        clock.now += max(0.0, ctl.delay(clock.now, tokens))
        ctl.book(clock.now, tokens)
        out.append(clock.now)
    return out


def test_a_pace_has_no_burst_at_start_nor_after_a_pause() -> None:
    clock = FakeClock()
    ctl = RateController(600, clock=clock, concurrency=1)  # 10 a second
    first = starts(ctl, clock, 20)
    assert first[0] == 0.0
    assert all(b - a == pytest.approx(0.1) for a, b in zip(first, first[1:], strict=False))
    clock.now += 600.0  # idle for ten minutes: no credit builds up beyond a late timer's catch-up
    again = starts(ctl, clock, 20)
    assert again[0] == clock.now - (again[-1] - again[0]) or again[0] >= first[-1] + 600.0
    assert min(b - a for a, b in zip(again, again[1:], strict=False)) >= 0.1 - MAX_SLACK - 1e-9
    assert again[-1] - again[0] >= 19 * 0.1 - MAX_SLACK - 1e-9


def test_tokens_are_paced_and_a_bigger_answer_is_charged_after() -> None:
    clock = FakeClock()
    ctl = RateController(tpm=60_000, clock=clock, concurrency=1)  # 1,000 tokens a second
    assert ctl.counts_tokens
    times = starts(ctl, clock, 3, tokens=500)
    assert times == pytest.approx([0.0, 0.5, 1.0])
    ctl.correct(500, 2_500)  # the last call used 2,000 tokens more than estimated
    assert ctl.delay(clock.now, 500) == pytest.approx(2.5)


async def test_a_cooldown_holds_callers_already_waiting_in_line() -> None:
    """The server says its limit is used up while workers wait for their turn: none of them goes
    before the cool-down ends (they queued before it started)."""
    mt = ManualTime()
    ctl = RateController(600, clock=mt, sleep=mt.sleep, concurrency=1)
    started: list[float] = []

    async def caller() -> None:
        await ctl.acquire()
        started.append(mt.now)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    await mt.advance(0.0)
    assert started == [0.0] and ctl.waiting == 3  # the others wait in line for the pace
    await mt.advance(0.05)
    ctl.observe(RateInfo(remaining_requests=0, reset_requests=5.0))
    assert ctl.cooling_down() and "used up" in (ctl.describe() or "")
    step = 0.05
    while not all(c.done() for c in callers):
        await mt.advance(mt.now + step)
    assert started[0] == 0.0 and min(started[1:]) >= 5.05
    assert started[1:] == sorted(started[1:]) and started[3] - started[1] >= 0.2 - 2 * MAX_SLACK


async def test_the_slow_start_holds_the_first_wave_until_answers_come() -> None:
    """Until the first statuses come back, a quarter of the concurrency; then everything at once."""
    mt = ManualTime()
    ctl = RateController(clock=mt, sleep=mt.sleep, concurrency=64)
    assert ctl.window == 16 and not ctl.free()
    went = 0

    async def caller() -> None:
        nonlocal went
        await ctl.acquire()
        ctl.started()
        went += 1

    callers = [asyncio.create_task(caller()) for _ in range(40)]
    await mt.advance(0.0)
    assert went == 16  # a quarter of the concurrency before any answer
    for _ in range(8):  # half a window accepted without a 429: the server takes what we send
        ctl.answered(200)
    await mt.advance(0.0)
    assert ctl.window is None and went == 40 and ctl.free()
    await asyncio.gather(*callers)


# -- the controller: 429s --------------------------------------------------------------------------------


def rate_limited(retry_after: float | None = 1.0, info: RateInfo | None = None) -> RateLimited:
    return RateLimited("HTTP 429", status=429, retry_after=retry_after, rate_info=info)


def test_stray_429s_delay_only_their_own_call() -> None:
    """One call in fifty answered 429 with Retry-After: 1, at a high rate: no pattern, nobody slows down."""
    clock = FakeClock()
    ctl = RateController(clock=clock, concurrency=4)
    for i in range(5_000):
        clock.now += 0.002
        started = ctl.started()
        clock.now += 0.001
        if i % 50 == 25:
            assert ctl.on_rate_limited(rate_limited(1.0), started) == 1.0  # this call waits its Retry-After
        else:
            ctl.succeeded(started)
    assert ctl.learned is None and ctl.decreases == 0 and ctl.free() and not ctl.cooling_down()
    assert ctl.rate_limited == 100


def test_a_pattern_of_429s_slows_everyone_and_success_climbs_back() -> None:
    clock = FakeClock()
    ctl = RateController(clock=clock, concurrency=4)
    for _ in range(200):  # 100 calls a second accepted
        clock.now += 0.01
        ctl.succeeded(ctl.started())
    for _ in range(40):  # then every call refused: well over a tenth of the last two seconds' answers
        clock.now += 0.01
        ctl.on_rate_limited(rate_limited(1.0), ctl.started())
        if ctl.decreases:
            break
    assert ctl.learned is not None and ctl.decreases == 1
    slowed = ctl.learned
    assert 50 < slowed < 100  # a fraction of what the server accepted: about 70 of 100 a second
    assert "learned from 429s" in (ctl.describe() or "pacing to") or ctl.waiting == 0
    for _ in range(500):
        clock.now += max(0.0, ctl.delay(clock.now))
        ctl.book(clock.now)
        ctl.held_back(clock.now)
        ctl.succeeded(ctl.started())
    assert ctl.learned is not None and ctl.learned > slowed  # additive increase while the pace holds calls back


def test_429s_of_calls_sent_before_a_decrease_do_not_decrease_again() -> None:
    clock = FakeClock()
    ctl = RateController(clock=clock, concurrency=4)
    early = [ctl.started() for _ in range(10)]
    clock.now += 0.1
    for started in early[:3]:
        ctl.on_rate_limited(rate_limited(1.0), started)
    assert ctl.decreases == 1
    clock.now += 0.5
    for started in early[3:]:  # answers to calls that left before we slowed down
        ctl.on_rate_limited(rate_limited(1.0), started)
    assert ctl.decreases == 1


def test_a_limit_announced_by_headers_is_paced_and_a_used_up_limit_pauses_everyone() -> None:
    clock = FakeClock()
    ctl = RateController(6000, clock=clock, concurrency=4)
    ctl.observe(RateInfo(limit_requests=600, remaining_requests=0, reset_requests=0.5))
    assert ctl.rpm == 600 and ctl.cooling_down() and ctl.delay(clock.now) == pytest.approx(0.5)
    ctl.observe(RateInfo(limit_requests=9000))
    assert ctl.rpm == 6000  # the client's own limit still holds
    delay = ctl.on_rate_limited(rate_limited(0.2, RateInfo(remaining_tokens=0, reset_tokens=3.0)), ctl.started())
    assert delay == 3.0 and ctl.delay(clock.now) == pytest.approx(3.0)


# -- the controller against a modelled server (fake clock) --------------------------------------------------


def test_model_announced_limit_with_the_client_set_to_it() -> None:
    r = run(BucketServer(1000, announce=True), 3000, concurrency=64, latency=0.05, rpm=1000)
    assert r.done == 3000 and r.share_429 <= 0.01 and r.used >= 0.95


def test_model_announced_limit_found_from_headers_alone() -> None:
    r = run(BucketServer(1000, announce=True), 3000, concurrency=64, latency=0.05)
    assert r.done == 3000 and r.share_429 <= 0.01 and r.used >= 0.95


@pytest.mark.parametrize("precise", [False, True], ids=["retry-after-seconds", "retry-after-ms"])
def test_model_unannounced_limit_is_learned(precise: bool) -> None:
    r = run(BucketServer(1000, precise=precise), 3000, concurrency=64, latency=0.05)
    assert r.done == 3000 and r.share_429 <= 0.05 and r.used >= 0.85, (r.share_429, r.used)
    assert r.controller.learned is not None and 0.6 < r.controller.learned * 60 / 1000 < 1.2


def test_model_unannounced_limit_at_high_latency_and_concurrency() -> None:
    r = run(BucketServer(3000), 6000, concurrency=200, latency=0.2)
    assert r.done == 6000 and r.share_429 <= 0.05 and r.used >= 0.85, (r.share_429, r.used)


def test_model_a_five_requests_a_minute_key() -> None:
    """A whole minute's worth at once, then one call per 12 s, 429s with Retry-After only: after the first
    wave the pace holds the limit, instead of every waiting task firing after each pause."""
    server = BucketServer(5, window=60)
    r = run(server, 100, concurrency=64, latency=0.5)
    first_wave = r.controller.window or 16
    assert r.done == 100 and server.refused <= first_wave + 6, server.refused
    assert r.used >= 0.7  # the climb back is slow at such a rate: a few 429s over the whole run
    assert r.controller.learned is not None and r.controller.learned * 60 <= 5


def test_model_stray_429s_cost_little_throughput() -> None:
    clean = run(BucketServer(1e9), 20000, concurrency=100, latency=0.2)
    stray = run(BucketServer(1e9, refuse_share=0.02), 20000, concurrency=100, latency=0.2)
    assert stray.controller.decreases == 0
    assert clean.elapsed / stray.elapsed >= 0.85


def test_model_a_429_storm_never_brings_the_run_to_a_halt() -> None:
    """Half of all calls refused at random (Retry-After 50 ms): slowing down does not help, and the pace
    stays above about one call per Retry-After."""
    r = run(BucketServer(1e9, refuse_share=0.5, refuse_after=0.05), 2000, concurrency=16, latency=0.05)
    assert r.done == 2000
    assert r.controller.learned is not None and r.controller.learned >= 0.7 / 0.05 - 1e-9
    assert r.elapsed < 600


# -- parsing and classification ---------------------------------------------------------------------------


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
    assert parse_retry_after(CIMultiDict({"retry-after": "tomorrow-ish"})) is None


def test_rate_info_from_openai_azure_and_litellm_headers() -> None:
    info = parse_rate_info(CIMultiDict({
        "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "2900", "x-ratelimit-reset-tokens": "6m0s"}))
    assert info == RateInfo(500, 0, 0.12, 30000, 2900, 360)
    assert info.used_up() == 0.12
    assert parse_rate_info(CIMultiDict({"content-type": "application/json"})) is None
    azure = parse_rate_info(CIMultiDict({"x-ratelimit-remaining-requests": "12",
                                         "x-ratelimit-remaining-tokens": "900"}))
    assert azure == RateInfo(remaining_requests=12, remaining_tokens=900) and azure.used_up() is None
    # LiteLLM names its scopes; the tightest of them binds.
    litellm = parse_rate_info(CIMultiDict({
        "x-ratelimit-api_key-limit-requests": "60", "x-ratelimit-api_key-remaining-requests": "7",
        "x-ratelimit-team-limit-requests": "40", "x-ratelimit-team-remaining-requests": "3",
        "x-ratelimit-api_key-limit-tokens": "100000", "x-ratelimit-api_key-limit-max_parallel_requests": "4"}))
    assert litellm == RateInfo(limit_requests=40, remaining_requests=3, limit_tokens=100000)


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


def test_an_error_page_with_newlines_stays_one_short_line() -> None:
    provider = Provider("http://127.0.0.1:1/v1", api_key="k-123456")
    page = b"<html>\n<head><title>502 Bad Gateway</title></head>\r\n<body>\n" + b"x" * 5000 + b"\n</body></html>"
    text = str(provider._error(502, page, CIMultiDict()))
    assert "\n" not in text and "\r" not in text and len(text) < 600 and "502 Bad Gateway" in text


def test_the_same_refusal_is_one_kind_whatever_its_numbers() -> None:
    a = BadRequest("HTTP 400: context length 4096, your messages had 5012 tokens", status=400, code="ctx")
    b = BadRequest("HTTP 400: context length 4096, your messages had 4410 tokens", status=400, code="ctx")
    c = BadRequest("HTTP 400: invalid image url", status=400, code="img")
    assert failure_kind(a) == failure_kind(b) != failure_kind(c)


def test_azure_uses_the_api_key_header_and_api_version() -> None:
    p = Provider("https://x.openai.azure.com/openai/deployments/d", api_key="k", api_type="azure",
                 api_version="2024-10-21")
    assert p._headers["api-key"] == "k" and "Authorization" not in p._headers
    assert p._params == {"api-version": "2024-10-21"}
    assert Provider("http://127.0.0.1/v1", api_key="k")._headers["Authorization"] == "Bearer k"


def test_a_base_url_with_a_query_string_is_joined_with_the_path_before_the_query() -> None:
    p = Provider("https://gw.example.com/v1?token=abc", api_key=None)
    assert str(p._urls["/chat/completions"]) == "https://gw.example.com/v1/chat/completions?token=abc"
    assert "token" not in p.shown_url


def test_backoff_is_exponential_with_full_jitter_capped_and_honours_retry_after() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        for _ in range(50):
            d = backoff(attempt, base=0.5, cap=8.0, rng=rng)
            assert 0 <= d <= min(8.0, 0.5 * 2 ** (attempt - 1))
    assert backoff(1, base=0.5, cap=8.0, retry_after=20.0, rng=rng) == 20.0
    top = max(backoff(4, base=1.0, cap=100.0, rng=rng) for _ in range(200))
    assert top > 6.0  # jitter spans the whole range up to 2**3


def test_backoff_arithmetic_cannot_overflow() -> None:
    """After thousands of failures in a row (nothing listening for hours) the delay is the cap."""
    for attempt in (1025, 10**6, 10**12):
        assert backoff_cap(attempt, base=1.0, cap=60.0) == 60.0
        assert 0 <= backoff(attempt, base=1.0, cap=60.0) <= 60.0


def test_token_estimate_counts_prompt_and_reserved_output() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_request_tokens(body, 256) == 100 + 4 + 50
    assert estimate_request_tokens({"messages": [{"role": "user", "content": "abcd"}]}, 256) == 1 + 4 + 256


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
