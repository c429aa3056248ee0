"""Fixtures and helpers of the object-store tests: a real S3 API server (moto) on 127.0.0.1, file:// stores,
and the stand-in writer (tests/remote_driver.py) run as a real process. Test modules load this with
``pytest_plugins``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-aws-SECRET-d41d8cd98f00b204"  # looks like nothing real; tests search messages for it


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1; stop() and start() again on the same port keep its buckets
    (moto's backends live in this process), which is how tests take the store away for a while."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.running = True

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test-access-key",
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1"}

    def bucket(self) -> str:
        import boto3

        name = f"b-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="y").create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's variables in this process's environment, where obstore reads them."""
    s3_server.start()
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty state URL on each kind of store."""
    if request.param == "file":
        return (tmp_path / "bucket").as_uri()
    server: S3Server = request.getfixturevalue("s3_env")
    return f"s3://{server.bucket()}/jobs/{uuid.uuid4().hex[:6]}"


def driver_env(server: S3Server | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCRAFT_", "AWS_"))}
    if server is not None:
        env.update(server.env())
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_driver(url: str, state: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.remote_driver", "--url", url, "--state", str(state),
                             *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_driver(url: str, state: Path, env: dict[str, str], *args: str, timeout: float = 120) -> Any:
    proc = start_driver(url, state, env, *args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def acks(out: str) -> list[int]:
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("ACK ")]


class Driver:
    """A running stand-in writer whose output lines are collected by a thread, so a test can wait for one."""

    def __init__(self, url: str, state: Path, env: dict[str, str], *args: str) -> None:
        self.proc = start_driver(url, state, env, *args)
        self.lines: list[str] = []
        self.err = ""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and not pred(self.lines)):
                    raise AssertionError(f"driver never got there; output: {self.lines[-5:]} {self.stderr()}")
                self._cond.wait(min(left, 0.5))

    def acks(self) -> list[int]:
        with self._cond:
            return acks("\n".join(self.lines))

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.err = self.proc.stderr.read()
            self.proc.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return rc

    def stderr(self) -> str:
        return self.err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def acked_past(n: int) -> Callable[[list[str]], bool]:
    return lambda lines: any(line.startswith("ACK ") and int(line.split()[1]) >= n for line in lines)
