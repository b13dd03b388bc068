"""A real S3 server on loopback for tests, and a proxy that breaks it on demand.

Loaded as a pytest plugin by tests/conftest.py. The server is moto's standalone server
in a subprocess (not `mock_aws` patching): requests go through aiobotocore, aiohttp and
TCP exactly as they would against AWS, and a test can stop and restart the process to
cause a real outage. Ray workers in other processes can reach it too, through the
`storage_options` of `s3_bucket`.

Fixtures:
- `s3_server` (session): the running `MotoServer`; `.endpoint_url`, `.stop()`, `.start()`,
  `.reset()`. Restarting it loses every bucket (moto keeps state in memory).
- `s3_bucket` (function): a fresh, empty bucket, as `S3Bucket(name, storage_options,
  endpoint_url)` with `.url` and `.fs()`; the AWS environment points at the server
  (AWS_ENDPOINT_URL, fake credentials, no profile files) for the test's duration.
- `s3_faults` (function): a `FaultProxy` in front of the server, for the same bucket:
  `.fail_next(n)` answers the next n requests with an HTTP 503, `.stop()` refuses
  connections, `.start()` lets them through again. Its `storage_options` turn botocore's
  own retries off, so each request the client makes is one request the proxy sees.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import NamedTuple

import pytest

REGION = "eu-west-1"  # not us-east-1: s3fs sends it as a LocationConstraint, which us-east-1 rejects
FAKE_KEY, FAKE_SECRET = "segflow-test-key", "segflow-test-secret"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3-compatible server as a subprocess on 127.0.0.1, restartable on one port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._admin = None
        # A test run that dies without fixture teardown must not leave the server behind
        # (it ignores SIGTERM, and would keep its port and memory).
        atexit.register(self.stop)
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (if stopped) and wait until it answers HTTP."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answered, even if with an error
            except OSError:
                time.sleep(0.05)
        self.stop()
        with open(self._log.name, errors="replace") as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"moto server did not come up on port {self.port} within {timeout}s; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGKILL the server process: new connections are refused; its state is lost."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=10)
        self._proc = None

    @property
    def admin_fs(self):
        """One s3fs filesystem kept for fixtures' own calls (a new one costs ~0.3 s of model loading)."""
        if self._admin is None:
            self._admin = make_s3fs(s3_options(self.endpoint_url))
        return self._admin

    def close(self) -> None:
        """Stop for good and delete the server's log."""
        self.stop()
        self._log.close()
        os.unlink(self._log.name)

    def reset(self) -> None:
        """Delete every bucket and object (moto's reset API); a no-op while stopped."""
        if not self.running:
            return
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        if self._admin is not None:
            self._admin.invalidate_cache()


class S3Bucket(NamedTuple):
    """An empty bucket on the test server, and the options that reach it from any process."""

    name: str
    storage_options: dict
    endpoint_url: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def fs(self):
        """A fresh s3fs filesystem for this bucket's server (never a cached instance)."""
        return make_s3fs(self.storage_options)


def s3_options(endpoint_url: str, **extra) -> dict:
    """storage_options for an s3fs filesystem talking to `endpoint_url` with fake credentials."""
    return {"endpoint_url": endpoint_url, "key": FAKE_KEY, "secret": FAKE_SECRET,
            "client_kwargs": {"region_name": REGION}, **extra}


def make_s3fs(storage_options: dict):
    """An s3fs filesystem built from `storage_options`, bypassing fsspec's instance cache."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is needed for S3 tests (pip install -e '.[test]')")
    server = MotoServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server: MotoServer, monkeypatch, tmp_path) -> S3Bucket:
    import s3fs

    s3_server.start()  # a previous test may have stopped it
    # The standard AWS places point at the test server, and nothing reads a real profile.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Cached filesystems would carry listings (and connections) from the previous test.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = S3Bucket(f"segflow-test-{uuid.uuid4().hex[:12]}", s3_options(s3_server.endpoint_url),
                      s3_server.endpoint_url)
    s3_server.admin_fs.mkdir(bucket.name)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
    s3_server.reset()


@pytest.fixture
def s3_faults(s3_server: MotoServer, s3_bucket: S3Bucket):
    proxy = FaultProxy(("127.0.0.1", s3_server.port))
    proxy.start()
    yield proxy
    proxy.stop()


class FaultProxy:
    """A loopback HTTP proxy in front of the S3 server that fails requests on demand.

    Each connection carries one request: the proxy adds `Connection: close` both ways, so
    pooled clients (aiohttp) open a new connection per request and every request meets
    the fault switch, whatever connection reuse the client would otherwise do.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.failed = 0  # requests answered with an injected error
        self.forwarded = 0  # requests passed to the server
        self._fail_remaining = 0
        self._status, self._code = 503, "ServiceUnavailable"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def storage_options(self, **extra) -> dict:
        """Options reaching the server through this proxy, with botocore's retries off."""
        config = {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}
        return s3_options(self.endpoint_url, config_kwargs=config, **extra)

    def fail_next(self, n: int, status: int = 503, code: str = "ServiceUnavailable") -> None:
        """Answer the next `n` requests with `status` and an S3 error body carrying `code`.

        The default code is not one s3fs retries by itself (it does retry "SlowDown"), so
        the n failures reach the caller's own retry loop.
        """
        with self._lock:
            self._fail_remaining, self._status, self._code = n, status, code

    def start(self) -> None:
        """Listen (again) on the same port."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the ones in flight: the endpoint is down."""
        listener, self._listener = self._listener, None
        if listener is not None:
            _close(listener)
        with self._lock:
            open_sockets, self._open = list(self._open), set()
        for s in open_sockets:
            _close(s)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        with self._lock:
            self._open.add(client)
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            with self._lock:
                fail = self._fail_remaining > 0
                if fail:
                    self._fail_remaining -= 1
                    self.failed += 1
                else:
                    self.forwarded += 1
                status, code = self._status, self._code
            if fail:
                _drain_body(client, head, rest)
                client.sendall(_error_response(status, code, head_only=head.startswith(b"HEAD ")))
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._open.add(upstream)
            upstream.sendall(_connection_close(head) + rest)
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            response_head, response_rest = _read_head(upstream)
            while response_head is not None and response_head.startswith(b"HTTP/1.1 1"):
                client.sendall(response_head + b"\r\n\r\n")  # "100 Continue" passes unchanged
                response_head, response_rest = _read_head(upstream, response_rest)
            if response_head is not None:
                client.sendall(_connection_close(response_head) + response_rest)
                _pump(upstream, client)
        except OSError:
            pass  # the proxy was stopped, or a peer went away: the client sees a dropped connection
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._open.discard(s)
                    _close(s)


def _read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes | None, bytes]:
    """(the HTTP head without its blank line, bytes read past it); (None, b"") at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def _connection_close(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n"


def _drain_body(sock: socket.socket, head: bytes, rest: bytes) -> None:
    """Read the request body, so closing the socket sends our answer rather than a reset."""
    if b"expect: 100-continue" in head.lower():
        return  # the client sends no body until told to continue, and we will not
    sock.settimeout(2)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    chunked = b"transfer-encoding: chunked" in head.lower()
    try:
        while (len(rest) < length) or (chunked and not rest.endswith(b"0\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    except OSError:
        pass


def _error_response(status: int, code: str, head_only: bool) -> bytes:
    """An S3-style error; a HEAD answer carries no body (S3's does not, and clients reject one)."""
    body = b"" if head_only else (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by the test proxy</Message><RequestId>segflow-test</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} Injected Failure\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept() or recv()
    except OSError:
        pass
    sock.close()
