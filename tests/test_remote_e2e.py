"""``--state-url`` end to end: the real CLI against the simulator, with its state replicated to a real S3 API
server on 127.0.0.1 (moto) or a file:// store. Machine loss (kill -9, the local dir deleted, a fresh dir on
the same URL), the store unreachable mid-run, two machines on one URL, and the read-only commands on a URL."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.remote_helpers")  # before the import below, as in test_remote_crash

from asyncraft.remote import Remote, restore  # noqa: E402
from asyncraft.remote.layout import LEASE, Head  # noqa: E402
from tests.conftest import cli_env, run_cli, write_prompts  # noqa: E402
from tests.helpers import ROOT, SimProcess, start_simulator, task_states, wait_until  # noqa: E402
from tests.remote_helpers import SECRET, S3Server  # noqa: E402
from tests.test_crash import hash_of_task  # noqa: E402
from tests.test_metrics import scrape, value  # noqa: E402

pytest_plugins = ("tests.remote_helpers",)

SIM_ARGS = ("--latency-ms", "20", "--seed", "5")
CONCURRENCY = 8
IN_FLIGHT = 2 * CONCURRENCY  # per worker: one call at the server, one answered record on its way to disk
RECORDS = 400
INTERVAL = 0.3  # ASYNCRAFT_REMOTE_INTERVAL of these tests
LEASE_S = 2.0


@pytest.fixture(scope="module")
def sim() -> Any:
    proc = start_simulator(*SIM_ARGS)
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The input and the export of an uninterrupted local-only run (on its own simulator)."""
    tmp = tmp_path_factory.mktemp("reference")
    inp = tmp / "requests.jsonl"
    write_prompts(inp, RECORDS)
    sim = start_simulator(*SIM_ARGS)
    try:
        env = cli_env(sim, ASYNCRAFT_CONCURRENCY="32")
        res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp / "state"), env=env)
        assert res.returncode == 0, res.stderr
        return inp, export(env, tmp / "ref.jsonl", "--state-dir", str(tmp / "state"))
    finally:
        sim.close()


def export(env: dict[str, str], out: Path, *where: str) -> bytes:
    res = run_cli("export", *where, "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def remote_env(sim: SimProcess, durability: str, **extra: str) -> dict[str, str]:
    return cli_env(sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_REMOTE_DURABILITY=durability,
                   ASYNCRAFT_REMOTE_INTERVAL=str(INTERVAL), ASYNCRAFT_REMOTE_LEASE=str(LEASE_S),
                   ASYNCRAFT_SNAPSHOT_EVERY="120", ASYNCRAFT_SEGMENT_MB="0.02", **extra)


def start_run(inp: Path, state: Path, url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state),
                             "--state-url", url], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def lease_head(url: str) -> Head | None:
    blob = asyncio.run(Remote.open(url).get(LEASE))
    return None if blob is None else Head.decode(blob.data, url)


def wait_lease_expired(url: str) -> None:
    def expired() -> bool:
        head = lease_head(url)
        return head is None or head.expired(time.time())

    wait_until(expired, timeout=LEASE_S * 5, what="the killed owner's lease to expire")


def store_done(url: str, env: dict[str, str], tmp: Path) -> set[int]:
    """Task keys done according to the store (restored into a fresh dir, as another machine would)."""
    dest = tmp / f"peek-{time.monotonic_ns()}"
    asyncio.run(restore(Remote.open(url), dest))
    return set(task_states(dest).settled)


def paid(sim: SimProcess) -> Counter[str]:
    return Counter(sim.settled_stats()["paid_by_hash"])


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "async"])
def test_machine_loss_restores_and_continues(sim: SimProcess, reference: tuple[Path, bytes], store_url: str,
                                             durability: str, tmp_path: Path) -> None:
    inp, expected = reference
    task_hash = hash_of_task(inp)
    env = remote_env(sim, durability)
    sim.settled_stats()
    sim.reset()
    # The first machine: killed with -9 part-way.
    proc = start_run(inp, tmp_path / "machine-a", store_url, env)
    wait_until(lambda: sim.stats()["paid"] > 0 or proc.poll() is not None, what="the first call")
    t0 = time.monotonic()  # the rate of results is measured from here, without the start-up
    wait_until(lambda: sim.stats()["paid"] >= RECORDS // 2 or proc.poll() is not None, what="half the calls")
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    elapsed = time.monotonic() - t0
    first = paid(sim)
    in_store = {task_hash[k] for k in store_done(store_url, env, tmp_path)}
    lost = [h for h in first if h not in in_store]
    # Async: what the local disk had and the store had not yet (one interval, plus the round under way).
    allowance = IN_FLIGHT
    if durability == "async":
        allowance += math.ceil(sum(first.values()) / elapsed * 2 * INTERVAL)
    assert len(lost) <= allowance, f"{len(lost)} paid results are not in the store (allowed {allowance})"
    # The machine is gone: its disk with it. Another one starts with an empty dir once the lease expires.
    shutil.rmtree(tmp_path / "machine-a")
    wait_lease_expired(store_url)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "machine-b"), "--state-url", store_url,
                  env=env)
    assert res.returncode == 0, res.stderr
    assert "restored as generation" in res.stderr
    second = paid(sim) - first
    assert all(n == 1 for n in second.values()), "a call was paid twice within one run"
    again = [h for h in second if h in first]
    assert set(again) <= set(lost), "paid again for a result the store had"
    assert len(again) <= allowance
    assert export(env, tmp_path / "url.jsonl", "--state-url", store_url) == expected
    assert export(env, tmp_path / "local.jsonl", "--state-dir", str(tmp_path / "machine-b")) == expected


@pytest.mark.slow
def test_read_only_commands_on_a_url(sim: SimProcess, tmp_path: Path) -> None:
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 30)
    url = (tmp_path / "bucket").as_uri()
    env = remote_env(sim, "async")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "state"), "--state-url", url, env=env)
    assert res.returncode == 0, res.stderr
    st = run_cli("status", "--state-url", url, env=env)
    assert st.returncode == 0, st.stderr
    assert "30 done" in st.stdout and url in st.stdout
    assert "owner       nobody (released by" in st.stdout  # the run ended cleanly and let go of the lease
    ver = run_cli("verify", "--state-url", url, env=env)
    assert ver.returncode == 0 and "verify: ok" in ver.stdout, ver.stdout + ver.stderr
    tl = run_cli("tail", "-n", "3", "--state-url", url, env=env)
    assert tl.returncode == 0 and len(tl.stdout.splitlines()) == 3, tl.stdout + tl.stderr
    local = export(env, tmp_path / "local.jsonl", "--state-dir", str(tmp_path / "state"))
    assert export(env, tmp_path / "url.jsonl", "--state-url", url) == local
    assert len(local.splitlines()) == 30
    empty = run_cli("status", "--state-url", (tmp_path / "nothing").as_uri(), env=env)
    assert empty.returncode == 1 and "holds no asyncraft state" in empty.stderr


def test_bad_state_url_is_a_configuration_error(sim: SimProcess, tmp_path: Path) -> None:
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 3)
    env = remote_env(sim, "async")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "s"), "--state-url", "ftp://x/y", env=env)
    assert res.returncode == 2 and "scheme must be one of" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_unreachable_store_at_start_exits_75(sim: SimProcess, tmp_path: Path) -> None:
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 3)
    env = remote_env(sim, "async", AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k",
                     AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "s"), "--state-url", "s3://b/p", env=env)
    assert res.returncode == 75, res.stderr
    assert "Traceback" not in res.stderr and SECRET not in res.stderr
    assert not (tmp_path / "s" / "asyncraft.json").exists()
    st = run_cli("status", "--state-url", "s3://b/p", env=env)
    assert st.returncode == 75 and "try again when the store answers" in st.stderr, st.stderr
    assert "Traceback" not in st.stderr and SECRET not in st.stderr



class Run:
    """A running ``asyncraft run --state-url`` whose stderr is collected by a thread, so a test can wait for a line."""

    def __init__(self, inp: Path, state: Path, url: str, env: dict[str, str]) -> None:
        self.proc = start_run(inp, state, url, env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_for(self, text: str, n: int = 1, timeout: float = 30.0) -> None:
        wait_until(lambda: self.count(text) >= n or self.proc.poll() is not None, timeout=timeout, what=text)
        assert self.count(text) >= n, self.output()

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return rc

    def output(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["async", "sync"])
def test_store_unreachable_mid_run(sim_factory: Any, reference: tuple[Path, bytes], s3_env: S3Server,
                                   durability: str, tmp_path: Path) -> None:
    inp, expected = reference
    slow = sim_factory("--latency-ms", "100", "--seed", "5")  # long enough for an outage in the middle
    url = f"s3://{s3_env.bucket()}/job"
    env = remote_env(slow, durability, ASYNCRAFT_METRICS_PORT="0")
    run = Run(inp, tmp_path / "state", url, env)
    try:
        wait_until(lambda: slow.stats()["paid"] >= 60 or run.proc.poll() is not None, what="60 calls")
        s3_env.stop()
        at_stop = slow.stats()["paid"]
        run.wait_for("store unreachable since")
        metrics = re.search(r"metrics on (http://\S+)/metrics", run.output())
        assert metrics is not None, run.output()
        samples = scrape(metrics.group(1))
        assert value(samples, "asyncraft_replication_healthy") == 0
        assert value(samples, "asyncraft_replication_unreachable_since_seconds") > time.time() - 60
        assert value(samples, "asyncraft_replication_lag_records") > 0
        assert value(samples, "asyncraft_healthy") == 1  # an outage alone is no stall
        if durability == "async":
            wait_until(lambda: slow.stats()["paid"] >= at_stop + 60, what="the run to go on without the store")
        else:
            # Nothing is acknowledged while the store is away: each worker makes at most the call it had started
            # and one more before it waits for its record. Two progress lines later the calls have stopped.
            seen = run.count("store unreachable since")
            run.wait_for("store unreachable since", n=seen + 2)
            assert slow.stats()["paid"] - at_stop <= IN_FLIGHT
        assert run.proc.poll() is None, run.output()
    finally:
        s3_env.start()
    assert run.finish() == 0, run.output()
    res = run_cli("verify", "--state-url", url, env=env)
    assert res.returncode == 0 and "verify: ok" in res.stdout, res.stdout + res.stderr
    assert export(env, tmp_path / "url.jsonl", "--state-url", url) == expected


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["async", "sync"])
def test_two_runs_on_one_url(sim_factory: Any, reference: tuple[Path, bytes], store_url: str, durability: str,
                             tmp_path: Path) -> None:
    inp, expected = reference
    slow = sim_factory("--latency-ms", "50", "--seed", "5")  # slow enough that the first run is mid-job when stopped
    env = remote_env(slow, durability)
    first = Run(inp, tmp_path / "machine-a", store_url, env)
    try:
        wait_until(lambda: slow.stats()["paid"] >= 30 or first.proc.poll() is not None, what="30 calls")
        refused = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "machine-b"), "--state-url",
                          store_url, env=env)
        assert refused.returncode == 1 and "is in use by" in refused.stderr, refused.stderr
        assert not (tmp_path / "machine-b" / "asyncraft.json").exists()
        # The first owner freezes (a long GC pause, a suspended VM); its lease runs out and the second takes over.
        first.proc.send_signal(signal.SIGSTOP)
        wait_lease_expired(store_url)
        second = Run(inp, tmp_path / "machine-b", store_url, env)
        second.wait_for("as generation 2")
        wait_until(lambda: slow.stats()["paid"] >= 60 or second.proc.poll() is not None, what="the second run's calls")
    finally:
        first.proc.send_signal(signal.SIGCONT)
    # The old owner wakes up: its next renewal or upload finds the lease taken, and it stops without harm.
    assert first.finish() == 1, first.output()
    assert "replication to the state URL failed" in first.output() and "Traceback" not in first.output()
    assert second.finish() == 0, second.output()
    res = run_cli("verify", "--state-url", store_url, env=env)
    assert res.returncode == 0 and "verify: ok" in res.stdout, res.stdout + res.stderr
    assert export(env, tmp_path / "url.jsonl", "--state-url", store_url) == expected


# kill -9 at each failpoint of the object-store layer, part-way through a run of RECORDS records (a snapshot every
# 120 records, a chunk every INTERVAL); then the bucket as the kill left it must restore, and a run on an empty dir
# must finish the job with nothing lost.
KILL_POINTS = [
    ("remote.after_lease", 1),
    ("remote.after_start", 1),
    ("remote.before_file", 4),
    ("remote.after_file", 4),
    ("remote.before_chunk", 5),
    ("remote.after_chunk", 5),
    ("remote.before_head", 2),
    ("remote.after_head", 2),
    ("remote.mid_retention", 2),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "hit"), KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_kill_at_failpoint_then_restore(sim: SimProcess, reference: tuple[Path, bytes], point: str, hit: int,
                                        tmp_path: Path) -> None:
    inp, expected = reference
    url = (tmp_path / "bucket").as_uri()
    state = tmp_path / "state"
    env = remote_env(sim, "async")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), "--state-url", url,
                  env={**env, "ASYNCRAFT_FAILPOINTS": f"{point}@{hit}"})
    assert res.returncode == -signal.SIGKILL, f"{point}@{hit} did not fire: {res.stderr}"
    # The bucket as the kill left it: a restore reads it (or finds nothing yet, if the kill came first).
    ver = run_cli("verify", "--state-url", url, env=env)
    nothing_yet = point in ("remote.after_lease", "remote.after_start")
    if nothing_yet and ver.returncode == 1:
        assert "holds no asyncraft state" in ver.stderr, ver.stderr
    else:
        assert ver.returncode == 0 and "verify: ok" in ver.stdout, ver.stdout + ver.stderr
    # The machine is lost; the same path on a new disk holds no state (and this holder may take the lease at once).
    shutil.rmtree(state)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), "--state-url", url, env=env)
    assert res.returncode == 0, res.stderr
    assert export(env, tmp_path / "url.jsonl", "--state-url", url) == expected


@pytest.mark.slow
def test_kill_mid_restore_then_restore_again(sim: SimProcess, reference: tuple[Path, bytes], tmp_path: Path) -> None:
    inp, expected = reference
    url = (tmp_path / "bucket").as_uri()
    env = remote_env(sim, "async")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "a"), "--state-url", url,
                  env={**env, "ASYNCRAFT_FAILPOINTS": "remote.after_head@1"})  # a manifest in the store
    assert res.returncode == -signal.SIGKILL, res.stderr
    state = tmp_path / "b"
    wait_lease_expired(url)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), "--state-url", url,
                  env={**env, "ASYNCRAFT_FAILPOINTS": "remote.mid_restore@1"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert not (state / "asyncraft.json").exists()
    # The half-restored dir is set aside (never deleted) and the restore starts over.
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), "--state-url", url, env=env)
    assert res.returncode == 0, res.stderr
    assert list((state / "damaged").glob("remote-superseded-*"))
    assert export(env, tmp_path / "url.jsonl", "--state-url", url) == expected
