"""The RAFT job end to end: the real CLI against the simulator subprocess on 127.0.0.1.

``task_graph`` replays the job offline with the simulator's own deterministic content
(``simcontent``), so a test knows every request the CLI will pay for and its hash as the
simulator counts it, including the re-asked requests of rejected answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft import simcontent
from asyncraft.jobs.base import Task
from asyncraft.jobs.raft import STAGE_ANSWERS, RaftJob, RaftParams
from asyncraft.provider import Completion
from asyncraft.records import id_key
from asyncraft.simulate import body_hash
from tests.conftest import cli_env, run_cli
from tests.helpers import ROOT, SimProcess, journal_records, start_simulator, task_states
from tests.test_raft_units import make_pdf

DOCS = ROOT / "asyncraft" / "data" / "docs"
QUESTIONS = 3
CHUNK = 64
RAFT_FLAGS = ("--job", "raft", "--questions", str(QUESTIONS), "--chunk-size", str(CHUNK))


@dataclass
class Graph:
    """Every task the job will run against the simulator: key -> stage and the body hash of each paid try."""

    stage: dict[int, str] = field(default_factory=dict)
    hashes: dict[int, list[str]] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)  # 400s: never paid
    records: set[str] = field(default_factory=set)  # answer ids that become records
    failed: set[int] = field(default_factory=set)

    def all_hashes(self) -> Counter[str]:
        return Counter(h for hs in self.hashes.values() for h in hs)

    def durable(self, state: Path) -> set[str]:
        """Hashes of the paid requests whose outcome is on disk in ``state``."""
        if not (state / "asyncraft.json").exists():
            return set()
        rec = task_states(state)
        out: set[str] = set()
        for key, hashes in self.hashes.items():
            n = rec.attempts.get(key, 0) + (1 if key in rec.done or key in rec.failed else 0)
            out.update(hashes[:n])
        return out


def sim_answer(task: Task, dim: int = 64) -> Completion | None:
    if task.endpoint == "embed":
        return Completion({"embeddings": [simcontent.embed(x, dim) for x in task.body["input"]]}, None, None, None)
    if simcontent.BAD_REQUEST_MARKER in orjson.dumps(task.body).decode():
        return None
    return Completion({"content": simcontent.chat_reply(task.body)}, "stop", None, "sim-1")


def task_graph(inp: Path, **params: Any) -> Graph:
    job = RaftJob(inp, RaftParams(model="sim-1", **{"questions": QUESTIONS, "chunk_size": CHUNK, **params}))
    g = Graph()
    todo = [t for t in job.roots() if isinstance(t, Task)]
    while todo:
        task = todo.pop()
        key = id_key(task.id)
        if key in g.stage:
            continue
        g.stage[key] = task.stage
        g.hashes[key] = []
        current = task
        while True:
            answer = sim_answer(current)
            if answer is None:
                g.refused.add(key)
                break
            g.hashes[key].append(body_hash(current.body))
            outcome = job.handle(current, answer)
            if outcome.retry is not None:
                current = outcome.retry
                continue
            if outcome.fail is not None:
                g.failed.add(key)
            elif task.stage == STAGE_ANSWERS:
                g.records.add(task.id)
            todo.extend(outcome.children)
            break
    return g


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def export(state: Path, fmt: str, out: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    res = run_cli("export", "--state-dir", str(state), "--format", fmt, "--out", str(out), *extra, env=env)
    assert res.returncode == 0, res.stderr
    return res


def journal(state: Path) -> Iterator[dict[str, Any]]:
    yield from journal_records(state)


@pytest.fixture(scope="module")
def rsim() -> Iterator[SimProcess]:
    sim = start_simulator("--latency-ms", "3")
    yield sim
    sim.close()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """The bundled documents plus a PDF and a JSONL file."""
    d = tmp_path / "docs"
    shutil.copytree(DOCS, d)
    (d / "extra").mkdir()
    (d / "extra" / "keeper.pdf").write_bytes(make_pdf([
        "The last keeper of the North Point light retired in 1987 after thirty years.",
        "His logbooks are kept in the harbour museum and record every storm."]))
    (d / "extra" / "notes.jsonl").write_bytes(
        orjson.dumps({"text": "Rye flour feeds a young starter well. It carries many wild microbes."}) + b"\n"
        + orjson.dumps({"text": "A diaphone is a fog horn driven by compressed air. It gives a low groan."}) + b"\n")
    return d


@pytest.mark.slow
def test_run_then_export_every_format(rsim: SimProcess, docs: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    env = cli_env(rsim)
    res = run_cli("run", *RAFT_FLAGS, "--input", str(docs), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    graph = task_graph(docs)
    assert graph.records and not graph.failed

    raft = tmp_path / "raft.jsonl"
    export(state, "raft", raft, env)
    rows = read_jsonl(raft)
    assert {r["id"] for r in rows} == graph.records and len(rows) == len(graph.records)
    fields = ["id", "type", "question", "context", "oracle_context", "cot_answer", "instruction", "source",
              "chunk_index", "oracle_in_context"]
    assert all(list(r) == fields for r in rows)
    sources = {r["source"] for r in rows}
    assert sources == {"bicycles.md", "honeybees.txt", "lighthouses.md", "sourdough.md", "tides.txt",
                       "extra/keeper.pdf", "extra/notes.jsonl:1", "extra/notes.jsonl:2"}
    for r in rows:
        docs_in = r["context"]["sentences"][0]
        assert len(docs_in) == 4 and len(set(docs_in)) == 4 and len(r["context"]["title"][0]) == 4
        assert (r["oracle_context"] in docs_in) == r["oracle_in_context"]
        assert r["cot_answer"].count("<ANSWER>:") == 1 and "##begin_quote##" in r["cot_answer"]
        assert r["instruction"].endswith("</DOCUMENT>\n" + r["question"])
    share = sum(r["oracle_in_context"] for r in rows) / len(rows)
    assert 0.6 < share < 0.95  # p = 0.8
    # Rows are ordered by document, chunk and question, so two exports are identical files.
    assert [(r["source"], r["chunk_index"]) for r in rows] == sorted((r["source"], r["chunk_index"]) for r in rows)
    again = tmp_path / "again.jsonl"
    export(state, "raft", again, env)
    assert again.read_bytes() == raft.read_bytes()

    chat = tmp_path / "chat.jsonl"
    res = export(state, "chat", chat, env, "--system-prompt", "Use the documents.", "--split", "eval=0.1")
    chat_rows, chat_eval = read_jsonl(chat), read_jsonl(tmp_path / "chat.eval.jsonl")
    assert len(chat_eval) == round(0.1 * len(rows)) and len(chat_rows) + len(chat_eval) == len(rows)
    assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in chat_rows)
    assert chat_rows[0]["messages"][0]["content"] == "Use the documents."
    by_instruction = {r["instruction"]: r for r in rows}
    for r in chat_rows + chat_eval:
        src = by_instruction[r["messages"][1]["content"]]
        assert r["messages"][2]["content"] == src["cot_answer"]
    assert "eval" in res.stderr

    comp = tmp_path / "comp.jsonl"
    export(state, "completion", comp, env, "--prompt-column", "input", "--completion-column", "output",
           "--stop-token", "</s>")
    comp_rows = read_jsonl(comp)
    assert all(list(r) == ["input", "output"] and r["output"].endswith("</s>") for r in comp_rows)
    assert {r["input"] for r in comp_rows} == set(by_instruction)

    ev = tmp_path / "eval.jsonl"
    export(state, "eval", ev, env)
    ev_rows = read_jsonl(ev)
    by_id = {r["id"]: r for r in rows}
    for r in ev_rows:
        src = by_id[r["id"]]
        assert r["gold_final_answer"] == src["cot_answer"].rsplit("<ANSWER>:", 1)[1].strip()
        assert r["context"].startswith("<DOCUMENT>") and r["context"].endswith("</DOCUMENT>")
        assert r["question"] == src["question"]

    for fmt in ("raft", "chat", "completion", "eval"):
        export(state, fmt, tmp_path / f"{fmt}.parquet", env)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "raft.parquet")
    assert table.num_rows == len(rows) and table.column_names == fields
    assert table.to_pylist() == rows
    assert pq.read_table(tmp_path / "chat.parquet").to_pylist()[0]["messages"][0]["role"] == "user"

    wrong = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(tmp_path / "x.jsonl"),
                    env=env)
    assert wrong.returncode == 2 and "raft" in wrong.stderr
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
    assert not (state / "errors.jsonl").read_bytes().strip()

    load_with_datasets(tmp_path, {"raft": fields, "chat": ["messages"], "completion": ["prompt", "completion"],
                                  "eval": ["id", "question", "gold_final_answer", "context"]}, len(rows), monkeypatch)


def load_with_datasets(tmp_path: Path, columns: dict[str, list[str]], n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every export format loads with Hugging Face ``datasets`` unchanged (offline)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation notices are not what this test is about
        datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed (pip install "
                                                          "-e '.[test]')")
        datasets.disable_progress_bars()
        for fmt, cols in columns.items():
            if fmt != "completion":  # its .jsonl export above has custom column names
                ds = datasets.load_dataset("json", data_files=str(tmp_path / f"{fmt}.jsonl"), split="train")
                assert ds.column_names == cols
            pq_ds = datasets.load_dataset("parquet", data_files=str(tmp_path / f"{fmt}.parquet"), split="train")
            assert pq_ds.column_names == cols and pq_ds.num_rows == n
        ds = datasets.load_dataset("json", data_files=str(tmp_path / "raft.jsonl"), split="train")
        assert ds.num_rows == n and isinstance(ds[0]["context"]["sentences"][0], list)


def test_bad_documents_are_recorded_and_the_rest_goes_on(rsim: SimProcess, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    shutil.copy(DOCS / "tides.txt", d / "tides.txt")
    (d / "empty.md").write_text("\n  \n", encoding="utf-8")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "broken.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj <<")
    (d / "lines.jsonl").write_bytes(b'{"text": "A good line about tides and the Moon."}\n{oops\n')
    (d / "huge.md").write_text("big " * 5000, encoding="utf-8")
    (d / "gone.txt").symlink_to(d / "missing.txt")
    (d / "table.csv").write_text("a,b\n", encoding="utf-8")
    state = tmp_path / "state"
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--max-document-mb", "0.01",
                  env=cli_env(rsim))
    assert res.returncode == 0, res.stderr
    errors = [orjson.loads(x) for x in (state / "errors.jsonl").read_bytes().splitlines()]
    paths = sorted(e["path"] for e in errors)
    assert paths == ["broken.pdf", "empty.md", "gone.txt", "huge.md", "latin1.txt", "lines.jsonl:2"]
    assert all(e["k"] == "ierr" and e["msg"].startswith(e["path"]) for e in errors)
    export(state, "raft", tmp_path / "r.jsonl", cli_env(rsim))
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert {r["source"] for r in rows} == {"tides.txt", "lines.jsonl:1"}
    # A second run reads the same problems without recording them again.
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--max-document-mb", "0.01",
                  env=cli_env(rsim))
    assert res.returncode == 0, res.stderr
    assert sum(1 for r in journal(state) if r.get("k") == "ierr") == 6


@pytest.mark.parametrize(("structured", "why", "raw"), [
    ("auto", "no final answer in the JSON reply", '"quotes"'),
    pytest.param("off", "no <ANSWER>: tag", "##begin_quote##", marks=pytest.mark.slow),
])
def test_unusable_answers_are_retried_then_set_aside(structured: str, why: str, raw: str, rsim: SimProcess,
                                                     tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "good.txt").write_text("Honey keeps because it is dry. Bees fan it until little water is left.",
                                encoding="utf-8")
    (d / "untagged.txt").write_text(f"Tides follow the Moon across the sea. {simcontent.NO_ANSWER_TAG_MARKER}",
                                    encoding="utf-8")
    (d / "refused.txt").write_text(f"This chunk is refused by the server. {simcontent.BAD_REQUEST_MARKER}",
                                   encoding="utf-8")
    state = tmp_path / "state"
    env = cli_env(rsim, ASYNCRAFT_STRUCTURED=structured)
    rsim.reset()
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--answer-retries", "1", env=env)
    assert res.returncode == 0, res.stderr
    graph = task_graph(d, answer_retries=1, structured=structured)
    stats = rsim.settled_stats()
    assert Counter(stats["paid_by_hash"]) == graph.all_hashes()
    recs = list(journal(state))
    attempts = [r for r in recs if r["k"] == "attempt"]
    fails = [r for r in recs if r["k"] == "fail"]
    assert len(attempts) == QUESTIONS and all(why in r["why"] for r in attempts)
    answer_fails = [r for r in fails if r["stage"] == "answers"]
    assert len(answer_fails) == QUESTIONS
    for r in answer_fails:
        assert "after 2 attempt(s)" in r["error"]["message"] and "<ANSWER>" not in r["message"]["content"]
        assert raw in r["message"]["content"]  # the raw text is kept
    (refused,) = [r for r in fails if r["stage"] == "questions"]
    assert refused["error"]["status"] == 400 and refused["source"] == "refused.txt"
    # People find the failures: errors.jsonl and `tail --errors` with the raw replies, the console by reason.
    errors = [orjson.loads(x) for x in (state / "errors.jsonl").read_bytes().splitlines()]
    assert len(errors) == QUESTIONS + 1
    assert sorted(raw in (e.get("message") or {}).get("content", "") for e in errors) == [False] + [True] * QUESTIONS
    assert f"{QUESTIONS} x answers: {why}" in res.stderr and "1 x questions: HTTP 400" in res.stderr
    shown = run_cli("tail", "--state-dir", str(state), "--errors", "-n", "100", env=env).stdout
    assert shown.count(raw) == 2 * QUESTIONS  # every rejected try and every failure, with what the model said
    out = tmp_path / "r.jsonl"
    res = export(state, "raft", out, env)
    assert "3 question(s) have no usable answer" in res.stderr
    rows = read_jsonl(out)
    assert {r["source"] for r in rows} == {"good.txt"} and {r["id"] for r in rows} == graph.records
    # The refused chunk still serves as a distractor: it is part of the corpus.
    assert any("refused by the server" in doc for r in rows for doc in r["context"]["sentences"][0])
    # Nothing is asked again on a rerun; --retry-failed asks the failed ones once more.
    rsim.reset()
    assert run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--answer-retries", "1",
                   env=env).returncode == 0
    assert rsim.settled_stats()["paid"] == 0


@pytest.mark.slow
def test_too_small_corpus_still_produces_records(rsim: SimProcess, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "one.txt").write_text("The Fresnel lens was designed in 1822 by Augustin Fresnel.", encoding="utf-8")
    (d / "two.txt").write_text("A diaphone fog horn gives a deep two-tone groan over water.", encoding="utf-8")
    state = tmp_path / "state"
    env = cli_env(rsim)
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--p", "1", env=env)
    assert res.returncode == 0, res.stderr
    assert "only 2 chunk(s)" in res.stderr
    out = tmp_path / "r.jsonl"
    res = export(state, "raft", out, env)
    assert "1 distractor(s) instead of 3" in res.stderr
    rows = read_jsonl(out)
    assert len(rows) == 2 * QUESTIONS
    assert all(len(r["context"]["sentences"][0]) == 2 and r["oracle_in_context"] for r in rows)
    # Another --p changes only the assembly: allowed explicitly, and no call is made for it.
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--p", "0", env=env)
    assert res.returncode == 2 and "p: 1.0 -> 0.0" in res.stderr
    rsim.reset()
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--p", "0",
                  "--allow-config-change", env=env)
    assert res.returncode == 0, res.stderr
    assert rsim.settled_stats()["paid"] == 0
    export(state, "raft", out, env)
    again = read_jsonl(out)
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert not any(r["oracle_in_context"] or r["oracle_context"] in r["context"]["sentences"][0] for r in again)


def test_adding_a_document_pays_only_for_it(rsim: SimProcess, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    for name in ("tides.txt", "bicycles.md"):
        shutil.copy(DOCS / name, d / name)
    state = tmp_path / "state"
    env = cli_env(rsim)
    assert run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), env=env).returncode == 0
    before = task_graph(d)
    shutil.copy(DOCS / "honeybees.txt", d / "honeybees.txt")
    after = task_graph(d)
    rsim.reset()
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    paid = Counter(rsim.settled_stats()["paid_by_hash"])
    new = after.all_hashes() - before.all_hashes()
    assert paid == new and sum(paid.values()) > 0
    export(state, "raft", tmp_path / "r.jsonl", env)
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert {r["id"] for r in rows} == after.records


@pytest.mark.slow
def test_max_records_stops_cleanly_and_a_higher_limit_continues(rsim: SimProcess, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    shutil.copy(DOCS / "sourdough.md", d / "sourdough.md")
    state = tmp_path / "state"
    env = cli_env(rsim, ASYNCRAFT_CONCURRENCY="2")
    graph = task_graph(d)
    rsim.reset()
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--max-records", "4", env=env)
    assert res.returncode == 75, res.stderr
    assert "record limit reached" in res.stderr and "ASYNCRAFT_MAX_RECORDS" in res.stderr
    out = tmp_path / "r.jsonl"
    export(state, "raft", out, env)
    first = len(read_jsonl(out))
    assert 4 <= first <= 4 + 2 < len(graph.records)
    # The same limit again: stops at once without a call.
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--max-records", "4", env=env)
    assert res.returncode == 75, res.stderr
    res = run_cli("run", *RAFT_FLAGS, "--input", str(d), "--state-dir", str(state), "--max-records", "100000",
                  env=env)
    assert res.returncode == 0, res.stderr
    export(state, "raft", out, env)
    assert {r["id"] for r in read_jsonl(out)} == graph.records
    assert Counter(rsim.settled_stats()["paid_by_hash"]) == graph.all_hashes()  # nothing paid twice


def test_watch_mode_picks_up_a_new_document(rsim: SimProcess, tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    shutil.copy(DOCS / "tides.txt", d / "tides.txt")
    state = tmp_path / "state"
    env = cli_env(rsim)
    first = task_graph(d)
    rsim.reset()
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", *RAFT_FLAGS, "--input", str(d), "--state-dir",
                             str(state), "--watch", "--watch-interval", "0.1"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_paid(rsim, sum(first.all_hashes().values()), proc)
        shutil.copy(DOCS / "lighthouses.md", d / "lighthouses.md.tmp")
        os.replace(d / "lighthouses.md.tmp", d / "lighthouses.md")  # appears whole, as a finished file would
        both = task_graph(d)
        wait_paid(rsim, sum(both.all_hashes().values()), proc)
        assert proc.poll() is None, "watch mode ended by itself"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75, stderr.decode()
    assert Counter(rsim.settled_stats()["paid_by_hash"]) == both.all_hashes()
    export(state, "raft", tmp_path / "r.jsonl", env)
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert {r["id"] for r in rows} == both.records
    assert {r["source"] for r in rows} == {"tides.txt", "lighthouses.md"}


def wait_paid(sim: SimProcess, n: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Poll the simulator until ``n`` calls are paid (the run's progress), failing fast if the run died."""
    deadline = time.monotonic() + timeout
    while sim.stats()["paid"] < n:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "run ended"
        assert time.monotonic() < deadline, f"only {sim.stats()['paid']} of {n} calls after {timeout}s"
        time.sleep(0.02)


@pytest.mark.parametrize(("args", "fragment"), [
    (("--input", "nowhere"), "no such file or folder"),
    (("--input", "{csv}"), "unsupported document type"),
    (("--input", "{docs}", "--chunk-size", "100", "--chunk-overlap", "80"), "ASYNCRAFT_CHUNK_OVERLAP"),
    (("--input", "{docs}", "--question-template", "{csv}"), "must contain {chunk}"),
    (("--input", "{docs}", "--p", "1.5"), "--p must be <= 1"),
    (("--input", "{docs}", "--chunker", "magic"), "--chunker must be one of simple, semantic"),
])
def test_bad_settings_exit_2_with_one_clear_line(args: tuple[str, ...], fragment: str, tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    real = [a.replace("{csv}", str(csv)).replace("{docs}", str(DOCS)) for a in args]
    res = run_cli("run", "--job", "raft", "--state-dir", str(tmp_path / "s"), *real, env=cli_env())
    assert res.returncode == 2 and fragment in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_model_is_required(tmp_path: Path) -> None:
    env = {k: v for k, v in cli_env().items() if k != "ASYNCRAFT_MODEL"}
    res = run_cli("run", "--job", "raft", "--input", str(DOCS), "--state-dir", str(tmp_path / "s"), env=env)
    assert res.returncode == 2 and "ASYNCRAFT_MODEL" in res.stderr


def test_demo_runs_raft_then_the_prompts_job_end_to_end(tmp_path: Path) -> None:
    res = run_cli("demo", "--dir", str(tmp_path), env=cli_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "the RAFT job on" in res.stderr and "the prompts job on" in res.stderr
    prompts = (DOCS.parent / "prompts.jsonl").read_bytes().splitlines()
    results = read_jsonl(tmp_path / "results.jsonl")
    assert [r["status"] for r in results] == ["ok"] * len(prompts) and all(r["content"] for r in results)
    assert "run --job prompts --input" in res.stdout and "run --job raft --input" in res.stdout
    rows = read_jsonl(tmp_path / "raft.jsonl")
    train, held = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "train.eval.jsonl")
    assert len(rows) > 40 and len(train) + len(held) == len(rows) and held
    assert {r["source"] for r in rows} == {p.name for p in DOCS.iterdir()}
    # The record shape of raft.py (test_run_then_export_every_format, a slow test, checks every format).
    assert all(list(r)[:7] == ["id", "type", "question", "context", "oracle_context", "cot_answer", "instruction"]
               for r in rows)
    assert all(len(m["content"]) > 0 for r in train for m in r["messages"])
    assert "tail -f --state-dir" in res.stdout and str(tmp_path / "raft.jsonl") in res.stdout
    assert "429s" in res.stderr and "injected" in res.stderr
    assert run_cli("verify", "--state-dir", str(tmp_path / "state"), env=cli_env()).returncode == 0
