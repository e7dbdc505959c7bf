"""Fixtures (imported by tests/conftest.py): a real S3 server on loopback for the object-storage tests, moto's
`ThreadedMotoServer` bound to 127.0.0.1 on a free port, with the standard AWS variables pointing at it. Every
request it serves is recorded (method, path, status) from its werkzeug request log, so tests can count GETs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

BUCKET = "distseg-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
               "AWS_REGION": "us-east-1"}
_ANSI = re.compile(r"\x1b\[[\d;]*m")
_LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/[\d.]+" (\d+)')


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    requests: list[tuple[str, str, int]] = field(default_factory=list)

    def count(self, method: str, contains: str = "") -> int:
        return sum(1 for m, path, _ in self.requests if m == method and contains in path)


class _RequestLog(logging.Handler):
    def __init__(self, server: S3Server) -> None:
        super().__init__(logging.INFO)
        self.server = server

    def emit(self, record: logging.LogRecord) -> None:
        m = _LINE.search(_ANSI.sub("", record.getMessage()))  # werkzeug colours the status code
        if m:
            self.server.requests.append((m.group(1), m.group(2), int(m.group(3))))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = S3Server(endpoint, {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS})
    log = logging.getLogger("werkzeug")
    handler = _RequestLog(s3)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield s3
    log.removeHandler(handler)
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, the AWS variables set for this test, a fresh bucket `BUCKET` and an empty request log."""
    import boto3

    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    try:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
        for key in keys:
            client.delete_object(Bucket=BUCKET, Key=key)
    except client.exceptions.NoSuchBucket:
        client.create_bucket(Bucket=BUCKET)
    s3_server.requests.clear()
    return s3_server


def upload_tree(local: str | os.PathLike[str], bucket: str, prefix: str, endpoint: str) -> int:
    """Copy a folder into the bucket (test set-up); returns the number of objects."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    n = 0
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            key = f"{prefix}/{os.path.relpath(path, local)}"
            client.upload_file(path, bucket, key)
            n += 1
    return n


@pytest.fixture
def s3_with_auth(tmp_path, monkeypatch) -> Iterator[S3Server]:
    """A second moto server, in its own process (IAM enforcement is process-wide in moto), that checks credentials:
    its first request (creating `BUCKET`) is let through, every later one needs a key IAM knows. The AWS variables
    point at it with a key it does not know."""
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"}
    log = open(tmp_path / "moto_auth.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto did not start: {(tmp_path / 'moto_auth.log').read_text()}") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEYID000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        yield S3Server(endpoint, {})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
