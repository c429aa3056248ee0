"""The object-store layer's pure rules, without a store: what the bucket's objects mean (windows, gaps,
garbage), the head's encoding, scrubbing of secrets, and the replicator's lag accounting."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from asyncraft.remote import Remote, RemoteConfigError, RemoteStateError, scrub
from asyncraft.remote.client import Entry, secret_values
from asyncraft.remote.layout import (
    Head,
    ManifestRef,
    Start,
    chunk_key,
    file_key,
    garbage,
    parse_listing,
    resolve,
    start_key,
)
from asyncraft.remote.lease import Lease
from asyncraft.remote.replicate import Replicator

SEG1 = "000000000001.jsonl"
SEG2 = "000000000011.jsonl"


def listing(*keys: str) -> list[Entry]:
    return [Entry(k, 1) for k in keys]


def head(gen: int = 3, mseq: int = 0, files: dict[str, str] | None = None) -> Head:
    ref = None if not mseq else ManifestRef(f"snapshots/manifest-{mseq:012d}.json", mseq,
                                            file_key(1, f"snapshots/manifest-{mseq:012d}.json"), files or {})
    return Head(gen, "h", "w", 100.0, 10.0, ref)


def test_chunks_count_only_inside_their_generations_window() -> None:
    gens = parse_listing(listing(
        start_key(1), chunk_key(1, SEG1, 0, 50, 5), chunk_key(1, SEG1, 50, 100, 10),
        chunk_key(1, SEG1, 100, 150, 12),  # generation 1 woke up after the takeover at seq 10: ignored
        start_key(2), chunk_key(2, SEG2, 0, 40, 14),
    ))
    view = resolve(head(2), Start(2, ((1, 10),)), gens)
    assert [c.key for c in view.segments[SEG1]] == [chunk_key(1, SEG1, 0, 50, 5), chunk_key(1, SEG1, 50, 100, 10)]
    assert view.end_seq == 14 and list(view.segments) == [SEG1, SEG2]


def test_a_gap_in_adopted_history_is_damage_and_in_the_open_window_the_end() -> None:
    adopted_gap = parse_listing(listing(start_key(1), chunk_key(1, SEG1, 50, 100, 10), start_key(2)))
    with pytest.raises(RemoteStateError, match="missing an object"):
        resolve(head(2), Start(2, ((1, 10),)), adopted_gap)
    open_gap = parse_listing(listing(start_key(1), chunk_key(1, SEG1, 0, 50, 5), chunk_key(1, SEG1, 70, 100, 10)))
    view = resolve(head(1), Start(1, ()), open_gap)
    assert view.end_seq == 5 and view.ends() == {SEG1: 50}


def test_segments_the_manifest_covers_are_not_needed_and_the_next_must_follow_on() -> None:
    gens = parse_listing(listing(start_key(1), chunk_key(1, SEG1, 0, 100, 10), chunk_key(1, SEG2, 0, 30, 13)))
    view = resolve(head(1, mseq=10), Start(1, ()), gens)
    assert list(view.segments) == [SEG2] and view.end_seq == 13
    skipped = parse_listing(listing(start_key(1), chunk_key(1, SEG2, 0, 30, 13)))
    assert resolve(head(1, mseq=0), Start(1, ()), skipped).end_seq == 0  # records 1..10 are nowhere


def test_garbage_spares_newer_generations_and_what_the_head_names() -> None:
    run = file_key(1, "runs/a.zst")
    gens = parse_listing(listing(
        start_key(1), chunk_key(1, SEG1, 0, 100, 10), chunk_key(1, SEG1, 100, 120, 12), run,
        file_key(1, "runs/old.zst"), file_key(1, "snapshots/manifest-000000000010.json"),
        start_key(2), chunk_key(2, SEG2, 0, 30, 13), file_key(2, "runs/pending.zst"),
        start_key(3), chunk_key(3, SEG2, 30, 60, 16), file_key(3, "runs/newer-owner.zst"),
    ))
    h = head(2, mseq=10, files={"runs/a.zst": run})
    doomed = garbage(h, Start(2, ((1, 10),)), gens, superseded=set())
    assert set(doomed) == {chunk_key(1, SEG1, 0, 100, 10),  # covered by the manifest, a later segment exists
                           chunk_key(1, SEG1, 100, 120, 12),  # past generation 1's window: a late upload
                           file_key(1, "runs/old.zst")}
    assert start_key(1) not in doomed  # generation 1 still holds what the head names
    # With nothing of generation 1 left to keep, its start object goes, and goes last.
    h2 = Head(2, "h", "w", 100.0, 10.0, ManifestRef("snapshots/manifest-000000000013.json", 13,
                                                    file_key(2, "snapshots/manifest-000000000013.json"), {}))
    doomed2 = garbage(h2, Start(2, ((1, 10),)), gens, superseded=set())
    assert doomed2[-1] == start_key(1) and run in doomed2


def test_head_round_trip_and_damage() -> None:
    h = head(4, mseq=10, files={"runs/a.zst": "g/0000000001/f/runs/a.zst"})
    assert Head.decode(h.encode(), "x") == h
    with pytest.raises(RemoteStateError, match="damaged"):
        Head.decode(b'{"format": 1, "generation": "x"}', "s3://b/lease.json")
    with pytest.raises(RemoteStateError, match="format 9"):
        Head.decode(b'{"format": 9}', "s3://b/lease.json")
    assert h.expired(110.0) and not h.expired(109.9)


def test_scrub_hides_query_strings_userinfo_and_secret_values() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "abcdef123456", "AZURE_STORAGE_SAS_KEY": "sv=2024&sig=zzzzzz",
           "AWS_REGION": "eu-west-1", "HOME": "/root"}
    secrets = secret_values(env)
    assert secrets == {"abcdef123456", "sv=2024&sig=zzzzzz"}
    text = ("PUT https://acct.blob.core.windows.net/c/k?sv=2024&sig=zzzzzz failed; key abcdef123456; "
            "http://u:pw@host/x")
    out = scrub(text, secrets)
    for leaked in ("zzzzzz", "abcdef123456", "u:pw"):
        assert leaked not in out
    assert "eu-west-1" not in secrets and "https://acct.blob.core.windows.net/c/k?<redacted>" in out


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://x/y", "scheme must be one of"),
    ("s3:///prefix", "names no bucket"),
    ("file://relative/dir", "absolute path"),
    ("gs://bucket/p#frag", "not in the URL"),
])
def test_bad_state_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(RemoteConfigError, match=message):
        Remote.open(url, env={})


async def test_commits_coalesce_and_lag_counts_the_oldest_unshipped(tmp_path: Path) -> None:
    clock = [50.0]
    remote = Remote.open((tmp_path / "b").as_uri())
    lease = Lease(remote, holder="h", ttl=10.0)
    await lease.acquire()
    view = resolve(lease.head, None, {})
    rep = Replicator(remote, lease, tmp_path / "s", Start(lease.head.generation, ()), view,
                     manifest_files=lambda data: [], clock=lambda: clock[0])
    seg = tmp_path / "s" / "journal" / SEG1
    for i in range(1, 1001):
        rep.on_commit(seg, i * 100, i)
        clock[0] += 0.001
    st = rep.status()
    assert st.lag_records == 1000 and st.lag_seconds == pytest.approx(1.0)
    assert "lag 1000 records, 1.0 s" in st.describe()
    # A thousand small commits are one pending chunk, not a thousand: memory does not grow with an outage.
    assert len(rep._points[SEG1]) == 1  # noqa: SLF001 - the bound is the point of this test
    rep.on_commit(seg, 50, 1)  # nothing new (an announcement of what is already pending): ignored
    assert rep.status().committed_seq == 1000
    await asyncio.sleep(0)
