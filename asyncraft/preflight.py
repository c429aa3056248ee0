"""Checks before the first paid call: a key where one is needed, a model the server lists, a server that answers.

``GET /models`` costs nothing, so it answers three questions at once: is anything listening at the
base URL, does it take our key (or need one we do not have), and does it serve the model(s) the job
will ask for. A server without that endpoint is not an error: the run goes on and the fail-fast rules
of the scheduler apply.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from pathlib import PurePosixPath

from yarl import URL

from asyncraft.config import Settings
from asyncraft.endpoints import EndpointPool
from asyncraft.errors import AuthError, ConfigError, ConnectionFailed, ProviderError, Unreachable
from asyncraft.provider import Provider

log = logging.getLogger("asyncraft")

UNREACHABLE_WAIT = 25.0  # seconds to keep trying a base URL that does not answer before giving up
RETRY_EVERY = 2.0

# Hosted APIs that refuse every call without a key: no need to ask them to find out.
KEYED_HOSTS = ("api.openai.com", "openai.azure.com", "azure-api.net", "api.groq.com", "openrouter.ai",
               "api.together.xyz", "api.mistral.ai", "api.deepseek.com", "api.fireworks.ai",
               "generativelanguage.googleapis.com", "api.anthropic.com")


class Unanswered(ProviderError):
    """Nothing answered at a base URL for ``UNREACHABLE_WAIT`` seconds."""


def models_used(settings: Settings) -> list[str]:
    """The models a run of these settings asks for by name (the prompts job may name them per line)."""
    names = [settings.model] if settings.model else []
    if settings.job == "raft" and settings.chunker == "semantic":
        names.append(settings.embedding_model)
    return names


def serves_any_name(available: list[str]) -> bool:
    """llama.cpp's servers (llama-server, llama-cpp-python) load one model file, list its path, and answer
    whatever model a request names: there the name cannot be wrong."""
    return len(available) == 1 and ("/" in available[0] or available[0].lower().endswith(".gguf"))


def listed(model: str, available: list[str]) -> bool:
    """Ollama lists "llama3:latest" and serves "llama3"; llama.cpp lists the file it loaded."""
    for name in available:
        if model in (name, name.removesuffix(":latest"), PurePosixPath(name).stem, PurePosixPath(name).name):
            return True
    return False


async def check(settings: Settings, *, wait: float = UNREACHABLE_WAIT) -> None:
    """Raise ConfigError (exit 2) for a missing key or an unknown model, ``Unanswered`` (exit 75) when
    the server does not answer within ``wait`` seconds. Silent when all is well."""
    needs_key = [u for u in settings.base_url if _keyed_host(u)]
    if settings.api_key is None and needs_key:
        raise ConfigError(f"no API key: {_shown(needs_key[0])} needs one; set ASYNCRAFT_API_KEY or OPENAI_API_KEY "
                          "(or ASYNCRAFT_API_KEY_FILE)")
    if settings.model_check == "off":
        return
    if settings.resolved_api_type() == "azure":
        return  # Azure lists base models, not the deployments a URL names
    pool = EndpointPool(settings.base_url, api_key=settings.api_key, api_type=settings.resolved_api_type(),
                        api_version=settings.api_version, concurrency=1, request_timeout=settings.connect_timeout * 3,
                        connect_timeout=settings.connect_timeout)
    async with pool:
        several = len(pool.endpoints) > 1
        answered = 0
        for ep in pool.endpoints:
            try:
                # Of several servers, one that does not answer is left to the pool; all silent is an error.
                available = await _models(ep.provider, settings, 0.0 if several else wait)
            except Unanswered as exc:
                if not several:
                    raise
                log.warning("%s; the other endpoints take its calls", exc)
                continue
            answered += 1
            if available is None:
                continue
            for model in models_used(settings):
                if not listed(model, available) and serves_any_name(available):
                    log.warning("%s lists only the model file %s and answers every model name with it; "
                                "%r is sent as asked", ep.provider.shown_url, available[0], model)
                elif not listed(model, available):
                    close = difflib.get_close_matches(model, available, n=3, cutoff=0.5)
                    hint = f"; close matches: {', '.join(close)}" if close else (
                        f"; it lists {', '.join(available[:10])}" + (" ..." if len(available) > 10 else "")
                        if available else "; it lists none")
                    raise ConfigError(f"model {model!r} is not served by {ep.provider.shown_url}{hint} "
                                      "(ASYNCRAFT_MODEL_CHECK=off skips this check)")
        if several and not answered:
            await _models(pool.endpoints[0].provider, settings, wait)  # none answers: wait for the first


async def _models(provider: Provider, settings: Settings, wait: float) -> list[str] | None:
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return await provider.models()
        except AuthError as exc:
            if settings.api_key is None:
                raise ConfigError(f"no API key: {provider.shown_url} needs one ({exc}); set ASYNCRAFT_API_KEY or "
                                  "OPENAI_API_KEY (or ASYNCRAFT_API_KEY_FILE)") from None
            # Some keys may call models but not list them: the calls themselves will tell.
            log.debug("GET /models refused (%s); model check skipped", exc)
            return None
        except (Unreachable, ConnectionFailed) as exc:
            if time.monotonic() >= deadline:
                raise Unanswered(f"{exc} (tried for {wait:g}s)" if wait else str(exc)) from None
            if not told:
                log.error("%s; trying again for up to %gs", exc, wait)
                told = True
            await asyncio.sleep(min(RETRY_EVERY, max(0.0, deadline - time.monotonic())))
        except ProviderError as exc:
            log.debug("GET /models failed (%s); model check skipped", exc)
            return None


def _keyed_host(url: str) -> bool:
    host = (URL(url).host or "").lower()
    return any(host == h or host.endswith("." + h) for h in KEYED_HOSTS)


def _shown(url: str) -> str:
    return str(URL(url).with_user(None).with_query(None))
