"""Checks before the first paid call, against the simulator in this process (127.0.0.1, port 0)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from asyncraft import preflight
from asyncraft.config import Settings
from asyncraft.errors import ConfigError
from asyncraft.simulate import SimConfig, Simulator


@asynccontextmanager
async def simulator(**config: Any) -> AsyncIterator[Simulator]:
    async with Simulator(SimConfig(port=0, **config)) as sim:
        yield sim


def settings(*urls: str, **kw: Any) -> Settings:
    return dataclasses.replace(Settings(), base_url=urls, input="x", **{"model": "sim-1", "api_key": "k-123456", **kw})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


async def test_a_listed_model_passes_and_an_unlisted_one_is_refused_with_close_matches() -> None:
    async with simulator(models="gpt-4o-mini,gpt-4o,text-embedding-3-small") as sim:
        await preflight.check(settings(sim.base_url, model="gpt-4o-mini"))
        with pytest.raises(ConfigError, match=r"'gpt-4o-mni' is not served by .*close matches: gpt-4o-mini"):
            await preflight.check(settings(sim.base_url, model="gpt-4o-mni"))
        with pytest.raises(ConfigError, match="'text-embedding-3-large' is not served"):
            await preflight.check(settings(sim.base_url, model="gpt-4o", job="raft", chunker="semantic",
                                           embedding_model="text-embedding-3-large"))
        await preflight.check(settings(sim.base_url, model="nope", model_check="off"))
        assert sim.stats.requests == 0  # no chat or embeddings call: nothing paid


def test_names_are_matched_as_ollama_and_llama_cpp_list_them() -> None:
    assert preflight.listed("llama3.2", ["llama3.2:latest", "qwen2.5:7b"])
    assert preflight.listed("smollm2-135m-instruct", ["/models/smollm2-135m-instruct.gguf"])
    assert not preflight.listed("llama3.1", ["llama3.2:latest"])


async def test_a_server_listing_one_model_file_takes_any_name(caplog: pytest.LogCaptureFixture) -> None:
    # llama.cpp's servers list the file they loaded (as a path) and answer every model name with it.
    path = "/opt/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    async with simulator(models=path) as sim:
        await preflight.check(settings(sim.base_url, model="smollm2-135m-instruct"))
    assert f"lists only the model file {path}" in caplog.text
    async with simulator(models=f"{path},/opt/models/other.gguf") as sim:  # several files: names do matter
        with pytest.raises(ConfigError, match="'smollm2-135m-instruct' is not served"):
            await preflight.check(settings(sim.base_url, model="smollm2-135m-instruct"))


async def test_a_server_without_a_model_list_is_skipped_quietly() -> None:
    async with simulator() as sim:  # serves any model and lists none
        await preflight.check(settings(sim.base_url, model="whatever-model"))


async def test_a_key_is_required_where_the_server_refuses_without_one() -> None:
    async with simulator(api_key="the-right-key", models="sim-1") as sim:
        with pytest.raises(ConfigError, match="no API key: .* needs one"):
            await preflight.check(settings(sim.base_url, api_key=None))
        # A key that may call models but not list them is not refused here: the calls will tell.
        await preflight.check(settings(sim.base_url, api_key="another-key"))


async def test_a_hosted_api_without_a_key_is_refused_without_asking_it() -> None:
    for url in ("https://api.openai.com/v1", "https://my-resource.openai.azure.com/openai/deployments/d"):
        with pytest.raises(ConfigError, match="needs one"):
            await preflight.check(settings(url, api_key=None))


async def test_nothing_listening_is_said_at_once_and_given_up_after_the_wait(caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(preflight.Unanswered, match="Connection refused"):
        await preflight.check(settings(url), wait=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert f"cannot connect to {url}: Connection refused; trying again" in caplog.text


async def test_one_silent_endpoint_of_several_is_left_to_the_pool(caplog: pytest.LogCaptureFixture) -> None:
    async with simulator(models="sim-1") as sim:
        await preflight.check(settings(closed_port_url(), sim.base_url), wait=30)
    assert "the other endpoints take its calls" in caplog.text
