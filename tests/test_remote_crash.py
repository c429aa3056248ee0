"""The object-store layer under real processes: kill -9 at every upload and head write, the store going away
and coming back, and two machines on one state URL (refusal, takeover after kill -9, a SIGSTOPped owner
resumed after the takeover). The writer is the stand-in of tests/remote_driver.py; every ``ACK n`` it prints
in sync mode is a promise that records 1..n survive the loss of its machine."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.remote_helpers")  # before the import below, so its asserts explain

from asyncraft.remote import Remote, RemoteStateError, restore  # noqa: E402
from asyncraft.remote.layout import LEASE, Head, Start, garbage, parse_listing, start_key  # noqa: E402
from tests.remote_driver import read_state  # noqa: E402
from tests.remote_helpers import Driver, S3Server, acked_past, acks, driver_env, run_driver  # noqa: E402

pytest_plugins = ("tests.remote_helpers",)
pytestmark = pytest.mark.slow

RECORDS = 200
# (failpoint, hit): each fires part-way through a run of RECORDS records in commits of 5, a manifest every 40.
POINTS = [
    ("remote.after_lease", 1),
    ("remote.after_start", 1),
    ("remote.before_file", 4),
    ("remote.after_file", 4),
    ("remote.before_chunk", 9),
    ("remote.after_chunk", 9),
    ("remote.before_head", 2),
    ("remote.after_head", 2),
    ("remote.mid_retention", 2),
]


@pytest.fixture
def store(store_url: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    server = request.getfixturevalue("s3_env") if store_url.startswith("s3://") else None
    return store_url, driver_env(server)


def restored(url: str, dest: Path) -> dict[int, str] | None:
    try:
        asyncio.run(restore(Remote.open(url), dest))
    except RemoteStateError as exc:
        if "holds no asyncraft state" in str(exc):
            return None
        raise
    return read_state(dest)


def assert_holds_acked(state: dict[int, str] | None, acked: list[int], tag: str = "a") -> None:
    if state is None:
        assert acked == []
        return
    top = max(state, default=0)
    assert sorted(state) == list(range(1, top + 1)), "the restored journal has a gap"
    assert all(state[n] == f"{tag}-{n}" for n in state)
    assert max(acked, default=0) <= top, f"acknowledged up to {max(acked)} but the store holds {top}"


def assert_no_garbage(url: str) -> None:
    """Everything earlier generations left behind is gone once a later owner has run to the end."""

    async def check() -> None:
        remote = Remote.open(url)
        blob = await remote.get(LEASE)
        assert blob is not None
        head = Head.decode(blob.data, "lease")
        gens = parse_listing(await remote.list("g/"))
        newest = max(g for g, v in gens.items() if v.start)
        sblob = await remote.get(start_key(newest))
        assert sblob is not None
        start = Start.decode(sblob.data, "start")
        assert garbage(head, start, gens, set()) == []

    asyncio.run(check())


@pytest.mark.parametrize(("point", "hit"), POINTS)
def test_kill_at_failpoint_then_restore(store: tuple[str, dict[str, str]], tmp_path: Path, point: str,
                                        hit: int) -> None:
    url, env = store
    common = ("--records", str(RECORDS), "--ttl", "2.0", "--durability", "sync")
    rc, out, err = run_driver(url, tmp_path / "m1", {**env, "ASYNCRAFT_FAILPOINTS": f"{point}@{hit}"},
                              *common, "--holder", "m1")
    assert rc == -signal.SIGKILL, (rc, out[-300:], err[-2000:])
    assert f"failpoint {point} fired" in err
    acked = acks(out)
    assert_holds_acked(restored(url, tmp_path / "after-kill"), acked)
    # Half the cases go on on the same machine (its dir continues), half on a new one (restore from the
    # bucket, once the dead owner's lease has expired).
    same = POINTS.index((point, hit)) % 2 == 0
    nxt = ("--holder", "m1") if same else ("--holder", "m2", "--wait-lease", "20")
    rc, out2, err = run_driver(url, tmp_path / ("m1" if same else "m2"), env, *common, *nxt)
    assert rc == 0, (out2[-500:], err[-2000:])
    assert ("ATTACHED continued" in out2) == (same and acked != [] and "after_lease" not in point), out2[:200]
    assert restored(url, tmp_path / "final") == {n: f"a-{n}" for n in range(1, RECORDS + 1)}
    assert_no_garbage(url)


def test_kill_mid_restore_then_restore_again(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = store
    common = ("--records", "150", "--ttl", "2.0")
    rc, out, _ = run_driver(url, tmp_path / "m1", {**env, "ASYNCRAFT_FAILPOINTS": "remote.after_chunk@20"}, *common)
    assert rc == -signal.SIGKILL
    acked = acks(out)
    rc, _, err = run_driver(url, tmp_path / "m2", {**env, "ASYNCRAFT_FAILPOINTS": "remote.mid_restore@1"}, *common,
                            "--holder", "m2", "--wait-lease", "20")
    assert rc == -signal.SIGKILL and "remote.mid_restore fired" in err
    assert not (tmp_path / "m2" / "asyncraft.json").exists()  # a cut-short restore does not look like a state
    rc, out, err = run_driver(url, tmp_path / "m2", env, *common, "--holder", "m2")
    assert rc == 0, err[-2000:]
    assert "ATTACHED restored" in out
    assert list((tmp_path / "m2" / "damaged").glob("remote-superseded-*"))  # the partial copy, set aside
    final = restored(url, tmp_path / "final")
    assert final == {n: f"a-{n}" for n in range(1, 151)} and max(acked) <= 150


@pytest.mark.parametrize("durability", ["async", "sync"])
def test_store_unreachable_for_a_while(s3_env: S3Server, tmp_path: Path, durability: str) -> None:
    url = f"s3://{s3_env.bucket()}/job"
    env = driver_env(s3_env)
    d = Driver(url, tmp_path / "m1", env, "--records", "400", "--durability", durability, "--pace", "0.01",
               "--ttl", "3", "--snapshot-every", "100")
    try:
        d.wait_for(acked_past(30))
        s3_env.stop()
        seen = max(d.acks())
        if durability == "async":
            d.wait_for(acked_past(seen + 60))  # the run goes on locally
        else:
            # Acknowledgement waits for the store: give the writer time to (wrongly) go on, then look.
            with pytest.raises(AssertionError):
                d.wait_for(acked_past(seen + 10), timeout=1.5)
        s3_env.start()
        assert d.finish() == 0, d.stderr()[-2000:]
    finally:
        s3_env.start()
        d.kill()
    assert any(line.startswith("DONE 400") for line in d.lines)
    assert restored(url, tmp_path / "r") == {n: f"a-{n}" for n in range(1, 401)}


def test_second_owner_refused_then_takes_over_after_kill(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = store
    a = Driver(url, tmp_path / "a", env, "--records", "100000", "--pace", "0.01", "--ttl", "3.0", "--holder", "A")
    try:
        a.wait_for(acked_past(20))
        rc, out, _ = run_driver(url, tmp_path / "b", env, "--records", "300", "--ttl", "3.0", "--holder", "B")
        assert rc == 1 and "LEASE HELD" in out and "in use by A" in out
        a.kill()
    finally:
        a.kill()
    acked = a.acks()
    total = max(acked) + 100
    rc, out, err = run_driver(url, tmp_path / "b", env, "--records", str(total), "--ttl", "3.0", "--holder", "B",
                              "--wait-lease", "20")
    assert rc == 0, err[-2000:]
    assert "ATTACHED restored" in out
    assert restored(url, tmp_path / "r") == {n: f"a-{n}" for n in range(1, total + 1)}


def snapshot(url: str) -> dict[str, bytes]:
    async def read() -> dict[str, bytes]:
        remote = Remote.open(url)
        out = {}
        for e in await remote.list():
            blob = await remote.get(e.key)
            assert blob is not None
            out[e.key] = blob.data
        return out

    return asyncio.run(read())


def test_old_owner_resumed_after_sigstop_cannot_overwrite(store: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = store
    a = Driver(url, tmp_path / "a", env, "--records", "100000", "--pace", "0.01", "--ttl", "2.0", "--holder", "A",
               "--snapshot-every", "25")
    try:
        a.wait_for(acked_past(60))
        os.kill(a.proc.pid, signal.SIGSTOP)
        acked_a = a.acks()
        total = max(acked_a) + 200
        rc, out, err = run_driver(url, tmp_path / "b", env, "--records", str(total), "--ttl", "2.0", "--holder", "B",
                                  "--tag", "b", "--snapshot-every", "25", "--wait-lease", "20")
        assert rc == 0 and "ATTACHED restored" in out, err[-2000:]
        before = snapshot(url)
        expected = restored(url, tmp_path / "r1")
        assert expected is not None
        os.kill(a.proc.pid, signal.SIGCONT)
        assert a.finish() == 1
    finally:
        os.kill(a.proc.pid, signal.SIGCONT) if a.proc.poll() is None else None
        a.kill()
    assert any(line.startswith("LEASE LOST") for line in a.lines), a.lines[-3:]
    after = snapshot(url)
    b_gen = Head.decode(before[LEASE], "lease").generation
    a_prefix = f"g/{b_gen - 1:010d}/"
    assert {k: v for k, v in after.items() if k in before} == before  # nothing the new owner wrote changed
    assert all(k.startswith(a_prefix) for k in after.keys() - before.keys())  # only the old owner's own junk
    assert restored(url, tmp_path / "r2") == expected
    # What A acknowledged before it was stopped is in the new owner's state, as A's records.
    top_a = max(acked_a)
    assert all(expected[n] == f"a-{n}" for n in range(1, top_a + 1))
    # And so is anything A acknowledged after it was resumed: no acknowledgement outside the new history.
    assert all(expected.get(n) == f"a-{n}" for n in a.acks())
    assert sorted(expected) == list(range(1, total + 1))
