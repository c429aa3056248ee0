"""Fixtures and helpers of the object-store tests: a real S3 API server (moto) on 127.0.0.1, file:// stores,
and the stand-in writer (tests/remote_driver.py) run as a real process. Test modules load this with
``pytest_plugins``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
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
