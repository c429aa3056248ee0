"""What is on disk: the state dir's layout, the one resolver every command uses, recovery, compaction, salvage,
task states, readers, and format migration. Every write goes through ``fs.FS``.

The modules, by concern:

- ``fs``: the seam for every write, fsync, rename and unlink, and the translation of OS errors.
- ``layout``: names and paths, the lock, ``asyncraft.json``.
- ``runfile``: sealed runs (zstd frames) and their indexes.
- ``resolve``: what a state dir holds, and what is damaged.
- ``recover``: opening a state dir for a run (or a read-only command).
- ``compact``: journal segments into a run and a manifest.
- ``salvage``: setting damage aside.
- ``taskindex``: a run's tasks sorted by id with a membership filter, in its index.
- ``tasks``: task states across the runs and the live journal.
- ``readers``: records in seq order, and a task's record by id.
- ``migrate``: state format 1 to 2.
"""

from __future__ import annotations

import os

from asyncraft.storage import migrate
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import StateDir
from asyncraft.storage.recover import PayloadHook, Recovery, WantsHook, open_read, recover

__all__ = ["FS", "PayloadHook", "Recovery", "StateDir", "WantsHook", "ensure_current", "open_for_run",
           "open_read_only", "prepare"]


def prepare(sd: StateDir, fs: FS, *, salvage: bool = False) -> list[str]:
    """Make ``sd`` a format 2 state dir on disk (the caller holds the lock): directories, migration, leftovers."""
    sd.create_dirs(fs)
    if migrate.needs_migration(sd):
        return migrate.migrate(sd, fs, salvage=salvage)
    if migrate.has_leftovers(sd):
        migrate.finish(sd, fs)
    return []


def open_for_run(sd: StateDir, fs: FS, *, salvage: bool = False, wants: WantsHook | None = None,
                 on_payload: PayloadHook | None = None) -> Recovery:
    notes = prepare(sd, fs, salvage=salvage)
    rec = recover(sd, fs, salvage=salvage, wants=wants, on_payload=on_payload)
    rec.notes[:0] = notes
    return rec


def ensure_current(sd: StateDir) -> None:
    """A format 1 state dir is migrated before a read-only command reads it (under the lock, like a run)."""
    if sd.meta_path.exists() and (migrate.needs_migration(sd) or migrate.has_leftovers(sd)):
        fd = sd.lock()
        try:
            prepare(sd, FS())
        finally:
            os.close(fd)


def open_read_only(sd: StateDir, *, wants: WantsHook | None = None, on_payload: PayloadHook | None = None,
                   ) -> Recovery:
    """For status, export, verify and tail."""
    ensure_current(sd)
    return open_read(sd, wants=wants, on_payload=on_payload)
