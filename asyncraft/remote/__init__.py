"""State beyond the machine: a state dir replicated to object storage, restored anywhere, one owner at a time.

    remote = Remote.open("s3://bucket/jobs/x")           # or gs://, az://, file:///dir; no I/O yet
    attached = await attach(remote, state_dir, manifest_files=names_in_manifest, durability="sync")
    # recover state_dir as usual, announce it (on_commit per segment, on_manifest, on_meta), then:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(attached.replicator.run())
        ...  # the writer calls on_commit/on_immutable/on_manifest/on_meta and awaits durable(seq) in sync mode
        attached.replicator.stop()

    await restore(remote, empty_dir)                     # read-only copy for status/export/verify/tail

The commands reach this through ``asyncraft.remote.product`` (what the storage layer's manifests name, the
lease holder of a state dir, the read-only copy), imported only when a state URL is given.
"""

from asyncraft.remote.client import Remote, scrub
from asyncraft.remote.errors import (
    LeaseHeld,
    LeaseLost,
    ObjectMissing,
    RemoteConfigError,
    RemoteError,
    RemoteStateError,
    RemoteUnavailable,
)
from asyncraft.remote.lease import Lease, default_holder
from asyncraft.remote.replicate import FAILPOINTS, Durability, ManifestFiles, ReplicationStatus, Replicator
from asyncraft.remote.restore import LOCAL_RECORD, Attached, Restored, attach, restore

__all__ = [
    "FAILPOINTS", "LOCAL_RECORD", "Attached", "Durability", "Lease", "LeaseHeld", "LeaseLost", "ManifestFiles",
    "ObjectMissing", "Remote", "RemoteConfigError", "RemoteError", "RemoteStateError", "RemoteUnavailable",
    "ReplicationStatus", "Replicator", "Restored", "attach", "default_holder", "restore", "scrub",
]
