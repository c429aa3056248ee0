"""The journal writer in-process on a temporary state dir: group commit and what it tells its callers.
Milliseconds each; the power-loss harness (tests/test_powerloss.py) covers what reaches the disk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from asyncraft import storage
from asyncraft.journal import Journal
from asyncraft.storage import FS, StateDir
from tests.test_powerloss import META, make_record


async def _journal(root: Path, **kw: Any) -> tuple[Journal, asyncio.Task[None]]:
    fs = FS()
    sd = StateDir(root)
    rec = storage.open_for_run(sd, fs)
    sd.write_meta(fs, META)
    journal = Journal(sd, rec, fs=fs, **kw)
    return journal, asyncio.create_task(journal.run())


async def test_the_commit_hook_runs_with_the_callbacks_of_the_records_futures(tmp_path: Path) -> None:
    """A progress snapshot compares what the hook counted (per stage) with what the futures' owners counted
    (the scheduler): both must have moved when either has, or the two numbers disagree under load."""
    acked = 0
    seen: list[tuple[int, int]] = []  # (records the hook has seen, futures resolved) at each hook call
    hooked = 0

    def on_commit(batch: list[dict[str, Any]]) -> None:
        nonlocal hooked
        hooked += len(batch)
        seen.append((hooked, acked))

    def on_ack(_fut: asyncio.Future[None]) -> None:
        nonlocal acked
        acked += 1

    journal, writer = await _journal(tmp_path, fsync="off", on_commit=on_commit)
    for start, n in ((0, 1), (1, 3), (4, 5)):
        futs = [journal.submit(make_record(i)) for i in range(start, start + n)]
        for fut in futs:
            fut.add_done_callback(on_ack)
        await asyncio.gather(*futs)
        await asyncio.sleep(0)  # one turn: the hook and the callbacks are queued together
        assert seen and seen[-1] == (start + n, start + n)
    await journal.close()
    await writer
    assert all(h == a for h, a in seen), seen


async def test_records_handed_in_together_share_one_commit(tmp_path: Path) -> None:
    """Group commit: records that wait while a commit is on the disk go into the next one together."""
    batches: list[int] = []
    journal, writer = await _journal(tmp_path, fsync="batch", fsync_interval=0,
                                     on_commit=lambda batch: batches.append(len(batch)))
    await asyncio.gather(*(journal.submit(make_record(i)) for i in range(20)))
    await journal.close()
    await writer
    assert sum(batches) == 20 and len(batches) < 20 and journal.commits == len(batches)
