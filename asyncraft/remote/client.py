"""One object-store client for s3://, gs://, az:// (obstore, on Rust's object_store) and file:// URLs.

The client knows five operations, all relative to the state URL: get, create-only put, conditional update,
list and delete. Credentials come from each store's usual environment variables (obstore reads AWS_*,
GOOGLE_*, AZURE_* itself); every third-party error is translated here, once, into the errors of
``asyncraft.remote.errors`` with a message built from its parts and scrubbed of anything secret.

file:// is served by a small backend of our own instead of obstore's LocalStore, which cannot do a
conditional update and does not fsync: create-only is ``link(2)`` of a synced temp file, an update is a
compare-and-replace under ``flock(2)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import obstore
from obstore import exceptions as obx

from asyncraft.remote.errors import (
    AlreadyExists,
    ObjectMissing,
    PreconditionFailed,
    RemoteConfigError,
    RemoteError,
    RemoteUnavailable,
)

if TYPE_CHECKING:
    from obstore import PutMode, UpdateVersion
    from obstore.store import ClientConfig, ObjectStore

SCHEMES = ("s3", "gs", "az", "file")
# What a store operation raises for a fault of the world outside (anything else is a bug and propagates):
# obstore's own errors, the builtin FileNotFoundError/ValueError it uses, and OSError from file://.
_STORE_ERRORS = (obx.BaseError, OSError, ValueError, RemoteError)
# Names of environment variables whose values are secrets of some store (or look like one).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|_KEY$|_KEY_|SAS|CREDENTIAL|CONNECTION_STRING", re.I)
_QUERY = re.compile(r"(\w+://[^\s?#]*)\?[^\s\"'<>]*")
_USERINFO = re.compile(r"(\w+://)[^/\s@]+@")


@dataclass(frozen=True, slots=True)
class Version:
    """What a conditional update must match: the ETag, and the generation where the store has one (GCS)."""

    e_tag: str | None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    version: Version


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    size: int


class Backend(Protocol):
    async def get(self, key: str) -> Blob | None: ...
    async def download(self, key: str, dest: Path) -> int: ...
    async def create(self, key: str, data: bytes | Path) -> Version: ...
    async def update(self, key: str, data: bytes, expected: Version) -> Version: ...
    async def list(self, prefix: str) -> list[Entry]: ...
    async def delete(self, key: str) -> None: ...


def secret_values(env: Mapping[str, str]) -> frozenset[str]:
    """Values that must never be printed: every credential-looking variable of any store."""
    return frozenset(v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 6)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Drop query strings (SAS tokens, signatures) and user:password@ from URLs, and any known secret."""
    text = _USERINFO.sub(r"\1", _QUERY.sub(r"\1?<redacted>", text))
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "<redacted>")
    return text


def _summary(text: str) -> str:
    """The useful part of an object_store error: S3/Azure error code and message, or what failed."""
    code = re.search(r"<Code>([^<]+)</Code>", text)
    message = re.search(r"<Message>([^<]+)</Message>", text)
    status = re.search(r"status code: (\d{3}[^:\n]*)", text)
    if code:
        return f"{status.group(1) if status else 'error'} {code.group(1)}: {message.group(1) if message else ''}"
    if "error sending request" in text or "tcp connect" in text or "Connect" in text.split("Debug source")[0]:
        return "cannot connect"
    if "timed out" in text.lower() or "timeout" in text.split("\n", 1)[0].lower():
        return "timed out"
    if status:
        return status.group(1).strip()
    return text.split("\n", 1)[0][:300]


def _status(text: str) -> int | None:
    m = re.search(r"status code: (\d{3})", text)
    return int(m.group(1)) if m else None


class Remote:
    """The object store under one state URL. Construction does no I/O."""

    __slots__ = ("url", "_backend", "_secrets")

    def __init__(self, url: str, backend: Backend, secrets: frozenset[str]) -> None:
        self.url = url  # credential-free by construction (checked in open)
        self._backend = backend
        self._secrets = secrets

    @classmethod
    def open(cls, url: str, *, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> Remote:
        """``s3://bucket/prefix``, ``gs://bucket/prefix``, ``az://container/prefix`` or ``file:///dir``.

        ``env`` is where the store's credentials are (default: this process's environment); obstore reads
        the variables itself, this only learns which values to keep out of messages.
        """
        env = os.environ if env is None else env
        secrets = secret_values(env)
        parts = urlsplit(url)
        shown = scrub(url, secrets)
        if parts.scheme not in SCHEMES:
            raise RemoteConfigError(f"state URL {shown!r}: scheme must be one of "
                                    f"{', '.join(s + '://' for s in SCHEMES)}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise RemoteConfigError(f"state URL {shown!r}: credentials and options belong in the store's "
                                    "environment variables, not in the URL")
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise RemoteConfigError(f"state URL {shown!r}: a file URL needs an absolute path (file:///dir)")
            return cls(url.rstrip("/"), _FileBackend(Path(unquote(parts.path))), secrets)
        if not parts.netloc:
            raise RemoteConfigError(f"state URL {shown!r} names no bucket")
        client: ClientConfig = {"timeout": timedelta(seconds=timeout),
                                "connect_timeout": timedelta(seconds=min(timeout, 10.0))}
        endpoint = env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT") or ""
        if parts.scheme == "s3" and endpoint.startswith("http://"):
            client["allow_http"] = True  # a local or private S3-compatible server named by the user
        try:
            # Our own loop retries with back-off and reports the outage; a hidden retry inside obstore
            # would only hide it (and make a lost reply to a conditional write look like a conflict).
            store = obstore.store.from_url(url.rstrip("/"), client_options=client,
                                           retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=timeout)})
        except Exception as exc:  # noqa: BLE001 - any construction failure is a configuration problem
            raise RemoteConfigError(f"state URL {shown!r}: {scrub(_summary(str(exc)), secrets)}") from None
        return cls(url.rstrip("/"), _CloudBackend(store), secrets)

    @property
    def backend(self) -> Backend:
        """The store behind this URL: the seam tests wrap to gate or fail operations."""
        return self._backend

    def where(self, key: str = "") -> str:
        return f"{self.url}/{key}" if key else self.url

    def _error(self, op: str, key: str, exc: BaseException) -> RemoteError:
        if isinstance(exc, RemoteError):
            exc.args = (scrub(f"object store {op} {self.where(key)}: {exc}", self._secrets),)
            return exc
        text = str(exc)
        where = self.where(key)
        msg = scrub(f"object store {op} {where}: {_summary(text)}", self._secrets)
        if isinstance(exc, obx.AlreadyExistsError):
            return AlreadyExists(msg)
        if isinstance(exc, obx.PreconditionError):
            return PreconditionFailed(msg)
        if "NoSuchBucket" in text or "ContainerNotFound" in text or "bucket does not exist" in text.lower():
            return RemoteConfigError(scrub(f"object store {self.url}: the bucket does not exist", self._secrets))
        if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError, obx.InvalidPathError,
                            obx.UnknownConfigurationKeyError, obx.NotSupportedError)):
            return RemoteConfigError(msg)
        if isinstance(exc, obx.GenericError | FileNotFoundError):
            status = _status(text)
            if status == 412:
                return PreconditionFailed(msg)
            if status in (400, 401, 403, 404, 405):
                return RemoteConfigError(msg)
        if isinstance(exc, PermissionError | ValueError):
            return RemoteConfigError(msg)
        return RemoteUnavailable(msg)

    async def get(self, key: str) -> Blob | None:
        """The object and its version, or None if there is none."""
        try:
            return await self._backend.get(key)
        except _STORE_ERRORS as exc:
            raise self._error("GET", key, exc) from None

    async def download(self, key: str, dest: Path) -> int:
        """Stream the object into ``dest`` (synced, not yet renamed by us); returns its size."""
        try:
            return await self._backend.download(key, dest)
        except _STORE_ERRORS as exc:
            raise self._error("GET", key, exc) from None

    async def create(self, key: str, data: bytes | Path) -> Version:
        """Create-only write; ``AlreadyExists`` if the key is taken (If-None-Match: *)."""
        try:
            return await self._backend.create(key, data)
        except _STORE_ERRORS as exc:
            raise self._error("PUT", key, exc) from None

    async def update(self, key: str, data: bytes, expected: Version) -> Version:
        """Replace the object only if it is still ``expected`` (If-Match); ``PreconditionFailed`` if not."""
        try:
            return await self._backend.update(key, data, expected)
        except _STORE_ERRORS as exc:
            raise self._error("PUT", key, exc) from None

    async def list(self, prefix: str = "") -> list[Entry]:
        """Every object under ``prefix`` (a whole path: ``g/`` lists ``g/1/x`` but not ``gx``)."""
        try:
            return await self._backend.list(prefix)
        except _STORE_ERRORS as exc:
            raise self._error("LIST", prefix, exc) from None

    async def delete(self, key: str) -> None:
        """Delete; a missing object is not an error (a clean-up may be repeated)."""
        try:
            await self._backend.delete(key)
        except _STORE_ERRORS as exc:
            raise self._error("DELETE", key, exc) from None


class _CloudBackend:
    __slots__ = ("_store",)

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    async def get(self, key: str) -> Blob | None:
        try:
            resp = await obstore.get_async(self._store, key)
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc) or "ContainerNotFound" in str(exc):
                raise
            return None
        data = bytes(await resp.bytes_async())
        return Blob(data, Version(resp.meta["e_tag"], resp.meta["version"]))

    async def download(self, key: str, dest: Path) -> int:
        try:
            resp = await obstore.get_async(self._store, key)
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc) or "ContainerNotFound" in str(exc):
                raise
            raise ObjectMissing(f"{key} is not in the store") from None
        size = 0
        fh = await asyncio.to_thread(open, dest, "wb")
        try:
            async for chunk in resp.stream(min_chunk_size=8 << 20):
                size += len(chunk)
                await asyncio.to_thread(fh.write, chunk)
            await asyncio.to_thread(_flush_sync, fh)
        finally:
            fh.close()
        return size

    async def create(self, key: str, data: bytes | Path) -> Version:
        res = await obstore.put_async(self._store, key, data, mode="create", use_multipart=False)
        return Version(res["e_tag"], res["version"])

    async def update(self, key: str, data: bytes, expected: Version) -> Version:
        version: UpdateVersion = {}
        if expected.e_tag is not None:
            version["e_tag"] = expected.e_tag
        if expected.version is not None:
            version["version"] = expected.version  # GCS matches its generation number, not the ETag
        mode: PutMode = version
        res = await obstore.put_async(self._store, key, data, mode=mode, use_multipart=False)
        return Version(res["e_tag"], res["version"])

    async def list(self, prefix: str) -> list[Entry]:
        out: list[Entry] = []
        async for batch in obstore.list(self._store, prefix or None, chunk_size=1000):
            out.extend(Entry(m["path"], m["size"]) for m in batch)
        return out

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self._store, key)


def _flush_sync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileBackend:
    """A directory as an object store. Hidden names (``.x``) are our temp and lock files, never objects."""

    __slots__ = ("_root",)

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise RemoteConfigError(f"invalid object key {key!r}")
        return self._root.joinpath(*parts)

    async def get(self, key: str) -> Blob | None:
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> Blob | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return Blob(data, Version(hashlib.sha256(data).hexdigest()))

    async def download(self, key: str, dest: Path) -> int:
        return await asyncio.to_thread(self._download, key, dest)

    def _download(self, key: str, dest: Path) -> int:
        try:
            src_fh = open(self._path(key), "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise ObjectMissing(f"{key} is not in the store") from None
        with src_fh as src, open(dest, "wb") as out:
            size = 0
            while block := src.read(8 << 20):
                out.write(block)
                size += len(block)
            out.flush()
            os.fsync(out.fileno())
        return size

    def _temp(self, path: Path, data: bytes | Path) -> tuple[Path, str]:
        """A synced hidden copy of ``data`` beside ``path``, and its ETag (the content's SHA-256)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        digest = hashlib.sha256()
        with open(tmp, "wb") as fh:
            if isinstance(data, Path):
                with open(data, "rb") as src:
                    while block := src.read(8 << 20):
                        digest.update(block)
                        fh.write(block)
            else:
                digest.update(data)
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp, digest.hexdigest()

    async def create(self, key: str, data: bytes | Path) -> Version:
        return await asyncio.to_thread(self._create, key, data)

    def _create(self, key: str, data: bytes | Path) -> Version:
        path = self._path(key)
        tmp, etag = self._temp(path, data)
        try:
            os.link(tmp, path)  # atomic and exclusive: the file:// If-None-Match
        except FileExistsError:
            raise AlreadyExists(f"{key} already exists") from None
        finally:
            tmp.unlink()
        _fsync_dir(path.parent)
        return Version(etag)

    async def update(self, key: str, data: bytes, expected: Version) -> Version:
        return await asyncio.to_thread(self._update, key, data, expected)

    def _update(self, key: str, data: bytes, expected: Version) -> Version:
        path = self._path(key)
        self._root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._root / ".cas.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != expected.e_tag:
                raise PreconditionFailed(f"{key} changed")
            tmp, etag = self._temp(path, data)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            os.close(fd)
        return Version(etag)

    def _list(self, prefix: str) -> list[Entry]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self._root
        out: list[Entry] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self._root).as_posix()
            for name in filenames:
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                with contextlib.suppress(FileNotFoundError):
                    out.append(Entry(key, os.stat(os.path.join(dirpath, name)).st_size))
        return out

    async def list(self, prefix: str) -> list[Entry]:
        return await asyncio.to_thread(self._list, prefix)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
