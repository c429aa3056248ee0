"""The prompts job keeps every byte the API returned: whole bodies, OpenAI Batch output, samples, repeated lines,
invalid and blank lines, metadata, and the embeddings and completions endpoints.

Each test runs the job in this process against the built-in simulator on 127.0.0.1 (port 0): real HTTP, real
journal, no subprocess. The export is read back as a user would read it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft import app, export, views
from asyncraft.config import Settings
from asyncraft.jobs.base import InputProblem, Task
from asyncraft.jobs.prompts import InputPosition, InputTracker, PromptsJob, Repeats
from asyncraft.records import content_id, id_key
from asyncraft.responses import response_body
from asyncraft.simulate import SimConfig, SimStats, Simulator, body_hash
from asyncraft.storage.layout import StateDir
from tests.conftest import cli_env, run_cli

KEY = "k-lossless-0123456789"


def chat(content: str, **params: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 64, **params}


def batch_line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def write_input(path: Path, lines: list[dict[str, Any] | str | None]) -> Path:
    """JSON objects as lines; a str is written as it is; None is a blank line."""
    out = []
    for line in lines:
        out.append(b"" if line is None else line.encode() if isinstance(line, str) else orjson.dumps(line))
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


async def run_job(tmp_path: Path, lines: list[dict[str, Any] | str | None], *, sim_config: SimConfig | None = None,
                  **options: Any) -> tuple[int, SimStats, Path]:
    """Run the prompts job on ``lines`` to the end; (exit status, what the simulator saw, state dir)."""
    inp = tmp_path / "requests.jsonl"
    if lines or not inp.exists():
        write_input(inp, lines)
    state = tmp_path / "state"
    async with Simulator(sim_config or SimConfig(port=0)) as sim:
        settings = dataclasses.replace(Settings(), input=str(inp), state_dir=str(state), base_url=(sim.base_url,),
                                       model="sim-1", api_key=KEY, progress="off", **options)
        rc = await app.main(settings)
        return rc, sim.stats, state


def exported(state: Path, fmt: str, *, partial: bool = False) -> tuple[list[dict[str, Any]], dict[str, int]]:
    out = state.parent / f"{fmt}.jsonl"
    ((_path, counts),) = export.export(StateDir(state), fmt, out, partial=partial)
    return [orjson.loads(line) for line in out.read_bytes().splitlines()], counts


@pytest.mark.parametrize("stream", ["auto", "off"])
async def test_batch_export_of_an_n2_request_with_logprobs_holds_both_choices(tmp_path: Path, stream: str) -> None:
    body = chat("Name two rivers.", n=2, logprobs=True, top_logprobs=2)
    rc, stats, state = await run_job(tmp_path, [batch_line("rivers", body)], stream=stream)
    assert rc == 0
    assert stats.streamed == (1 if stream == "auto" else 0)  # both ways of answering are covered

    (row,), counts = exported(state, "batch")
    assert counts == {"ok": 1}
    assert set(row) == {"id", "custom_id", "response", "error"}
    assert row["custom_id"] == "rivers" and row["error"] is None and row["id"].startswith("batch_req_")
    response = row["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    got = response["body"]
    assert got["object"] == "chat.completion" and got["system_fingerprint"] == "fp_asyncraft_sim"
    assert [c["index"] for c in got["choices"]] == [0, 1]
    first, second = (c["message"]["content"] for c in got["choices"])
    assert first != second
    for choice in got["choices"]:
        tokens = choice["logprobs"]["content"]
        assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
        assert all(len(t["top_logprobs"]) == 2 for t in tokens)
    assert got["usage"]["completion_tokens"] > 0

    (prow,), _ = exported(state, "prompts")
    assert prow["content"] == first and prow["finish_reason"] == "stop"  # the fields the format always had
    assert [c["content"] for c in prow["choices"]] == [first, second]


async def test_a_record_keeps_the_body_once_and_old_records_still_export(tmp_path: Path) -> None:
    _, _, state = await run_job(tmp_path, [chat("Say something.")])
    from tests.helpers import journal_records

    (done,) = [r for r in journal_records(state) if r.get("k") == "done"]
    content = done["raw"]["choices"][0]["message"]["content"]
    assert orjson.dumps(done).count(orjson.dumps(content)) == 1  # not stored twice
    assert "message" not in done and "finish_reason" not in done

    # A record written before the body was kept: read back as the body it was cut from.
    old = {"k": "done", "message": {"content": "hello", "refusal": "no"}, "finish_reason": "stop", "model": "m",
           "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    body = response_body(old)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello", "refusal": "no"},
                                "finish_reason": "stop"}]
    assert body["model"] == "m" and body["usage"] == old["usage"]


async def test_samples_draw_independent_answers_and_exports_carry_the_index(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str | None] = [batch_line("q1", chat("First question.")),
                                                batch_line("q2", chat("Second question."))]
    rc, stats, state = await run_job(tmp_path, lines, samples=1)
    assert rc == 0 and stats.paid == 2

    # Raising --samples keeps the answers paid for: only the new samples are asked.
    rc, stats, state = await run_job(tmp_path, [], samples=3, allow_config_change=True)
    assert rc == 0 and stats.paid == 4
    assert sorted(stats.paid_by_hash.values()) == [2, 2]  # the same body, asked again per sample

    rows, counts = exported(state, "prompts")
    assert counts == {"ok": 6}
    assert [(r["custom_id"], r["sample"]) for r in rows] == [("q1", 0), ("q1", 1), ("q1", 2),
                                                            ("q2", 0), ("q2", 1), ("q2", 2)]
    batch, _ = exported(state, "batch")
    assert [(r["custom_id"], r["sample"]) for r in batch] == [(r["custom_id"], r["sample"]) for r in rows]
    assert len({r["id"] for r in batch}) == 6

    # A finished state dir is finished: nothing is asked again.
    rc, stats, _ = await run_job(tmp_path, [], samples=3)
    assert rc == 0 and stats.paid == 0


async def test_repeated_lines_share_one_answer_and_repeated_custom_ids_are_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    same = chat("The same request.")
    lines: list[dict[str, Any] | str | None] = [batch_line("a", same), batch_line("b", chat("Another.")),
                                                batch_line("a", same), batch_line("c", same)]
    with caplog.at_level(logging.INFO, logger="asyncraft"):
        rc, stats, state = await run_job(tmp_path, lines)
    assert rc == 0 and stats.paid == 2
    log = caplog.text
    assert "line 3 has the custom_id of line 1" in log
    assert "2 line(s) repeat the request body of an earlier line and share its answer" in log
    st = views.status(StateDir(state))
    assert st["shared_lines"] == 2 and st["repeated_custom_ids"] == 1
    assert "2 line(s) share the answer of an earlier identical line" in views.format_status(st)
    rows, _ = exported(state, "prompts")
    assert [(r["line"], r["custom_id"]) for r in rows] == [(1, "a"), (2, "b"), (3, "a"), (4, "c")]
    assert rows[0]["content"] == rows[2]["content"] == rows[3]["content"]


async def test_invalid_and_blank_lines_get_a_row_with_their_custom_id(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str | None] = [
        batch_line("ok", chat("Fine.")),
        {"custom_id": "no-messages", "messages": []},
        None,
        '{"custom_id": "torn", "messages": [',
        batch_line("wrong-url", {"x": 1}, url="/v1/images/generations"),
    ]
    rc, _, state = await run_job(tmp_path, lines)
    assert rc == 0
    rows, counts = exported(state, "prompts")
    assert counts == {"ok": 1, "invalid": 3, "blank": 1}
    assert [(r["line"], r["custom_id"], r["status"]) for r in rows] == [
        (1, "ok", "ok"), (2, "no-messages", "invalid"), (3, None, "blank"), (4, None, "invalid"),
        (5, "wrong-url", "invalid")]
    assert "/v1/images/generations" in rows[4]["error"]["message"]
    batch, counts = exported(state, "batch")
    assert counts == {"ok": 1, "invalid": 3, "blank": 1}
    assert [(r["custom_id"], r["response"], (r["error"] or {}).get("code")) for r in batch[1:]] == [
        ("no-messages", None, "invalid_request"), (None, None, "blank_line"), (None, None, "invalid_request"),
        ("wrong-url", None, "invalid_request")]


async def test_a_refused_call_keeps_the_servers_error_body(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str | None] = [batch_line("good", chat("Fine.")),
                                                batch_line("refused", chat("[[sim:bad-request]] please"))]
    rc, _, state = await run_job(tmp_path, lines)
    assert rc == 0
    batch, counts = exported(state, "batch")
    assert counts == {"ok": 1, "failed": 1}
    refused = batch[1]
    assert refused["error"] is None  # as OpenAI's Batch API reports a request the server refused
    assert refused["response"]["status_code"] == 400 and refused["response"]["request_id"].startswith("req_")
    assert refused["response"]["body"]["error"]["code"] == "invalid_value"
    assert KEY not in orjson.dumps(batch).decode()


async def test_fields_outside_the_request_are_not_sent_and_come_back_as_metadata(tmp_path: Path) -> None:
    bare = {**chat("Bare line."), "custom_id": "bare-1", "topic": "rivers", "source": {"page": 3}}
    full = batch_line("full-1", chat("Batch line."), split="train")
    rc, stats, state = await run_job(tmp_path, [bare, full])
    assert rc == 0
    # What the server got: the request alone (the model comes from ASYNCRAFT_MODEL).
    assert set(stats.paid_by_hash) == {body_hash({**chat("Bare line."), "model": "sim-1"}),
                                       body_hash({**chat("Batch line."), "model": "sim-1"})}
    rows, _ = exported(state, "prompts")
    assert [r["metadata"] for r in rows] == [{"topic": "rivers", "source": {"page": 3}}, {"split": "train"}]
    batch, _ = exported(state, "batch")
    assert [r["metadata"] for r in batch] == [{"topic": "rivers", "source": {"page": 3}}, {"split": "train"}]


async def test_embeddings_and_completions_lines_run_end_to_end(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str | None] = [
        batch_line("emb", {"input": ["red apples", "green pears"]}, url="/v1/embeddings"),
        batch_line("cmp", {"prompt": "Once upon a time", "max_tokens": 16, "n": 2}, url="/v1/completions"),
        batch_line("chat", chat("And a chat line.")),
    ]
    rc, stats, state = await run_job(tmp_path, lines, sim_config=SimConfig(port=0, embedding_dim=8))
    assert rc == 0 and stats.paid == 3 and stats.embeddings == 1
    rows, counts = exported(state, "prompts")
    assert counts == {"ok": 3}
    emb, cmp, _ = rows
    assert len(emb["embeddings"]) == 2 and all(len(v) == 8 for v in emb["embeddings"])
    assert emb["usage"]["prompt_tokens"] > 0 and emb["usage"]["completion_tokens"] == 0
    assert cmp["content"] and len(cmp["choices"]) == 2
    batch, _ = exported(state, "batch")
    assert batch[0]["response"]["body"]["object"] == "list"
    assert [d["index"] for d in batch[0]["response"]["body"]["data"]] == [0, 1]
    assert batch[1]["response"]["body"]["object"] == "text_completion"
    assert batch[1]["response"]["body"]["choices"][0]["text"] == cmp["content"]

    # As Parquet: the body as JSON text, the vectors as lists.
    import pyarrow.parquet as pq

    export.export(StateDir(state), "batch", tmp_path / "b.parquet")
    table = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert [r["custom_id"] for r in table] == ["emb", "cmp", "chat"]
    assert orjson.loads(table[1]["response"])["body"]["object"] == "text_completion"
    export.export(StateDir(state), "prompts", tmp_path / "p.parquet")
    assert pq.read_table(tmp_path / "p.parquet").to_pylist()[0]["embeddings"] == emb["embeddings"]


@pytest.mark.slow
async def test_the_command_line_exports_the_batch_format(tmp_path: Path) -> None:
    rc, _, state = await run_job(tmp_path, [batch_line("one", chat("Hello."))])
    assert rc == 0
    out = tmp_path / "out.jsonl"
    done = run_cli("export", "--state-dir", str(state), "--format", "batch", "--out", str(out), env=cli_env())
    assert done.returncode == 0, done.stderr
    (row,) = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert row["custom_id"] == "one" and row["response"]["status_code"] == 200


def test_each_url_picks_its_endpoint_and_a_bare_line_stays_chat(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [
        batch_line("e", {"input": "x"}, url="/v1/embeddings"),
        batch_line("c", {"prompt": "x"}, url="/v1/completions"),
        batch_line("h", chat("x"), url="/v1/chat/completions"),
        chat("x"),
        batch_line("bad", {"input": []}, url="/v1/embeddings"),
    ])
    items = list(PromptsJob(inp, model="m", extra_body={}).roots())
    tasks = [i for i in items if isinstance(i, Task)]
    assert [t.endpoint for t in tasks] == ["embed", "complete", "chat", "chat"]
    assert tasks[2].id == tasks[3].id  # the same chat request, whichever form
    (problem,) = [i for i in items if isinstance(i, InputProblem)]
    assert '"input" must be a non-empty' in problem.message and problem.detail["custom_id"] == "bad"


def test_a_line_is_handled_only_when_all_its_samples_are(tmp_path: Path) -> None:
    inp = write_input(tmp_path / "in.jsonl", [chat("one"), chat("two")])
    settled: set[int] = set()
    job = PromptsJob(inp, model="m", extra_body={}, samples=2)
    job.resume_from(None, lambda key, problem: key in settled)
    tasks = [t for t in job.roots() if isinstance(t, Task)]
    assert [t.meta["sample"] for t in tasks] == [0, 1, 0, 1] and len({t.id for t in tasks}) == 4
    tracker = job.tracker
    assert isinstance(tracker, InputTracker)
    settled.add(id_key(tasks[0].id))
    assert tracker.advance() == InputPosition(0, 0, 0)  # line 1 has a sample still to do
    settled.add(id_key(tasks[1].id))
    assert tracker.advance().line == 1


def test_repeats_are_found_in_compact_arrays() -> None:
    repeats = Repeats()
    for line, (custom_id, content) in enumerate([("a", "x"), ("b", "y"), ("a", "x"), ("c", "z"), ("b", "x"),
                                                 ("a", "w"), (None, "y")], start=1):
        meta = {"line": line} if custom_id is None else {"line": line, "custom_id": custom_id}
        repeats.add(line, Task(content_id("prompts", content), "prompts", {}, meta))
    assert repeats.repeated_ids() == [(3, 1), (5, 2), (6, 1)]
    assert repeats.shared() == 3  # lines 3 and 5 ask what line 1 asked, line 7 what line 2 asked
    assert Repeats().shared() == 0 and Repeats().repeated_ids() == []


def test_token_estimates_of_embeddings_and_completions() -> None:
    from asyncraft.limits import estimate_request_tokens

    assert estimate_request_tokens({"input": ["x" * 40, "y" * 40], "model": "e"}, 256) == 20  # nothing generated
    assert estimate_request_tokens({"prompt": "x" * 40, "max_tokens": 5}, 256) == 10 + 5


async def test_an_error_keeps_the_servers_body_without_the_key() -> None:
    from asyncraft.errors import AuthError
    from asyncraft.provider import Provider

    wrong = "sk-wrong-key-0123456789"
    async with Simulator(SimConfig(port=0, api_key="the-right-key")) as sim, \
            Provider(sim.base_url, api_key=wrong) as provider:
        with pytest.raises(AuthError) as caught:
            await provider.chat({**chat("Hello."), "model": "sim-1"})
    err = caught.value
    assert err.body["error"]["code"] == "invalid_api_key"  # the simulator echoes the key, as careless servers do
    assert wrong not in orjson.dumps(err.body).decode() and "***" in err.body["error"]["message"]
    assert err.request_id is not None and err.request_id.startswith("req_")
