"""What asyncraft prints and writes for people: escaped control characters, an honest export, counted files."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import orjson

from asyncraft import cli
from asyncraft.text import safe, safe_json
from asyncraft.views import describe
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, SimProcess, wait_until

ESC_LINE = "req-\x1b[2J\nasyncraft: finished: all good\r\x9b31m\u2028"


def test_control_characters_are_shown_not_obeyed() -> None:
    assert safe(ESC_LINE) == "req-\\x1b[2J\\x0aasyncraft: finished: all good\\x0d\\x9b31m\\u2028"
    line = describe({"k": "done", "seq": 3, "id": "ab" * 16, "stage": "prompts", "custom_id": ESC_LINE,
                     "message": {"content": "ok"}, "usage": {}})
    assert "\n" not in line and "\x1b" not in line and "\x9b" not in line and "\\x1b[2J" in line
    raw = safe_json(orjson.dumps({"custom_id": ESC_LINE}).decode())
    assert "\x9b" not in raw and "\u2028" not in raw
    assert orjson.loads(raw) == {"custom_id": ESC_LINE}  # still the same JSON


def test_log_lines_escape_what_servers_and_input_say() -> None:
    cli._setup_logging("text")
    handler = logging.getLogger("asyncraft").handlers[0]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("asyncraft").warning("input problem: %s", ESC_LINE)
    out = stream.getvalue()
    assert out.count("\n") == 1 and "\x1b" not in out and out.startswith("asyncraft: input problem: req-\\x1b")


def test_an_unfinished_job_is_not_exported_as_if_complete(sim_factory: object, tmp_path: Path) -> None:
    sim: SimProcess = sim_factory("--latency-ms", "2000")  # type: ignore[operator]
    inp, state, out = tmp_path / "in.jsonl", tmp_path / "state", tmp_path / "out.jsonl"
    write_prompts(inp, 30)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="5", ASYNCRAFT_GRACE="10")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(state)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: sim.stats()["in_flight"] >= 5, what="calls in flight")
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 75
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 75, res.stderr
    assert "25 of 30 input lines have no result yet" in res.stderr and not out.exists()
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), "--partial", env=env)
    assert res.returncode == 0, res.stderr
    assert f"wrote 30 rows to {out} (5 ok, 25 pending)" in res.stderr
    statuses = [orjson.loads(x)["status"] for x in out.read_bytes().splitlines()]
    assert statuses.count("ok") == 5 and statuses.count("pending") == 25


def test_tail_follow_waits_for_a_state_dir_that_does_not_exist_yet(sim: SimProcess, tmp_path: Path) -> None:
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    write_prompts(inp, 5)
    env = cli_env(sim)
    tail = subprocess.Popen([sys.executable, "-m", "asyncraft", "tail", "-f", "--state-dir", str(state)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None
        assert "waiting for" in tail.stderr.readline()
        assert tail.poll() is None, tail.communicate()
        assert run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env).returncode == 0
        assert tail.stdout is not None
        lines: list[str] = []  # the five answers among the run's other records (its size, its input position)
        while sum(" done " in line for line in lines) < 5 and len(lines) < 20:
            lines.append(tail.stdout.readline())
        assert sum(" done " in line for line in lines) == 5, lines
    finally:
        tail.terminate()
        tail.communicate(timeout=30)


def test_a_utf8_byte_order_mark_is_skipped_and_utf16_is_named(tmp_path: Path) -> None:
    from asyncraft.errors import ConfigError
    from asyncraft.jobs.base import Task
    from asyncraft.jobs.prompts import PromptsJob

    line = orjson.dumps({"custom_id": "a", "body": {"messages": [{"role": "user", "content": "é"}]}})
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\n" + line.replace(b'"a"', b'"b"') + b"\n")
    items = list(PromptsJob(path, model="m", extra_body={}).roots())
    assert [type(i) for i in items] == [Task, Task] and items[0].meta == {"line": 1, "custom_id": "a"}
    path16 = tmp_path / "u16.jsonl"
    path16.write_bytes((line.decode() + "\n").encode("utf-16"))
    try:
        PromptsJob(path16, model="m", extra_body={})
    except ConfigError as exc:
        assert "UTF-16" in str(exc) and "iconv" in str(exc)
    else:
        raise AssertionError("UTF-16 input was not named")
