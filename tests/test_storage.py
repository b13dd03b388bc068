"""pipeline/storage.py against real local files, memory://, and a real S3 server.

Crash-safety tests kill a real writer process with SIGKILL at the worst moment (data
written, not yet committed) and look at what another process would see. Outage tests put
a fault-injecting proxy or a restart between the client and the S3 server.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from segflow.errors import ConfigError, ImageReadError, StorageError
from segflow.pipeline.storage import (
    clean_staging,
    commit_file,
    filesystem_for,
    is_transient,
    read_bytes,
    redact,
    to_uri,
    with_retries,
)
from tests.s3_fixtures import s3_options

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


# --- identity and redaction ----------------------------------------------------------------


def test_to_uri_is_a_plain_path_locally_and_a_url_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert to_uri(*filesystem_for("x.png")) == str(tmp_path / "x.png")
    assert to_uri(*filesystem_for(f"file://{tmp_path}/a/../x.png")) == str(tmp_path / "x.png")
    assert to_uri(*filesystem_for("s3a://bucket/dir/x.png")) == "s3://bucket/dir/x.png"
    assert to_uri(*filesystem_for("memory://dir/x.png")) == "memory:///dir/x.png"


@pytest.mark.parametrize("text, secret", [
    (f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/key.png", SECRET),
    ("https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
     "%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=deadbeefcafe", "deadbeefcafe"),
    ("https://b.s3.amazonaws.com/k.png?X-Amz-Security-Token=FwoGZXIvYXdzEJr&x=1", "FwoGZXIvYXdzEJr"),
    (f"aws_secret_access_key={SECRET}", SECRET),
    (f"storage_options={{'key': 'AKIAIOSFODNN7EXAMPLE', 'secret': '{SECRET}'}}", SECRET),
    ('{"token": "sessiontoken123"}', "sessiontoken123"),
    ("key id AKIAIOSFODNN7EXAMPLE leaked", "AKIAIOSFODNN7EXAMPLE"),
])
def test_redact_removes_credentials(text, secret):
    cleaned = redact(text)
    assert secret not in cleaned
    assert "***" in cleaned


def test_redact_leaves_ordinary_uris_alone():
    for uri in ("s3://bucket/retina/img@2x.png", "/data/a:b/c.png", "gs://b/k.png?generation=3"):
        assert redact(uri) == uri


def test_urls_with_embedded_credentials_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as info:
        filesystem_for(f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/x.png")
    assert SECRET not in str(info.value) and "storage_options" in str(info.value)


def test_unknown_protocol_is_a_config_error_naming_the_url():
    with pytest.raises(ConfigError, match=r"nosuch://bucket/x\.png: .*Protocol not known"):
        filesystem_for("nosuch://bucket/x.png")


# --- retries ----------------------------------------------------------------------------


class Flaky:
    """A callable that fails `failures` times with `error`, then returns "ok"."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def test_with_retries_recovers_from_transient_errors():
    flaky = Flaky(2, OSError(errno.EIO, "I/O error"))
    assert with_retries(flaky, what="/data/x.png", base_delay=0.001) == "ok"
    assert flaky.calls == 3


@pytest.mark.parametrize("error", [FileNotFoundError("x"), PermissionError("x"), IsADirectoryError("x"),
                                   NotADirectoryError("x"), OSError(errno.EINVAL, "bad bucket name"),
                                   ValueError("not storage")])
def test_with_retries_does_not_retry_what_cannot_change(error):
    flaky = Flaky(1, error)
    with pytest.raises(type(error)):
        with_retries(flaky, what="/data/x.png", base_delay=0.001)
    assert flaky.calls == 1


def test_with_retries_gives_up_with_a_storage_error_that_hides_secrets():
    url = f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/x.png?X-Amz-Signature=deadbeefcafe"
    flaky = Flaky(10, ConnectionResetError(f"reset while fetching {url}"))
    with pytest.raises(StorageError) as info:
        with_retries(flaky, what=url, attempts=3, base_delay=0.001)
    message = str(info.value)
    assert flaky.calls == 3
    assert "s3://***@bucket/x.png" in message and "after 3 attempts" in message and "ConnectionResetError" in message
    assert SECRET not in message and "deadbeefcafe" not in message and "AKIAIOSFODNN7EXAMPLE" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_botocore_errors_are_classified_by_status_and_code():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("Throttling", 400))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("AccessDenied", 403))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(OSError(errno.EBUSY, "SlowDown"))  # what s3fs makes of a 503


# --- reading ------------------------------------------------------------------------------


def test_read_bytes_of_a_missing_file_is_an_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="not found") as info:
        read_bytes(str(tmp_path / "gone.png"))
    assert info.value.uri == str(tmp_path / "gone.png") and info.value.stage == "read"


def test_read_bytes_of_a_malformed_uri_is_an_image_read_error():
    with pytest.raises(ImageReadError, match="nosuch://x.png"):
        read_bytes("nosuch://x.png")


# --- atomic commit, local -------------------------------------------------------------------


def test_commit_creates_parents_replaces_and_leaves_no_staging(tmp_path):
    target = tmp_path / "out" / "masks" / "shard-0.parquet"
    assert commit_file(str(target), b"first") == str(target)
    assert commit_file(f"file://{target}", b"second") == str(target)
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard-0.parquet"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not a tempfile's 0600


def test_commit_to_a_resolved_memory_filesystem():
    fs, path = filesystem_for(f"memory://segflow-test-{uuid.uuid4().hex}/out/a.bin")
    try:
        assert commit_file((fs, path), b"abc") == to_uri(fs, path)
        assert read_bytes(to_uri(fs, path)) == b"abc"
    finally:
        fs.rm(path.rsplit("/", 2)[0], recursive=True)


LOCAL_WRITER = """
import os, sys, time
import segflow.pipeline.storage as storage
target, marker = sys.argv[1], sys.argv[2]

def stall(fd):  # the bytes are written, the rename has not happened: the worst moment to die
    open(marker, "w").close()
    time.sleep(600)

os.fsync = stall
storage.commit_file(target, b"\\0" * (32 << 20))
"""


def run_until_marker(script: str, *args: str, marker: Path) -> subprocess.Popen:
    """Start `script` in a fresh interpreter and return once it has created `marker`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, *args, str(marker)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("writer never reached the point to kill it at")
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stderr.close()


def test_killed_local_writer_leaves_no_final_file_and_its_staging_is_invisible(tmp_path):
    out = tmp_path / "masks"
    commit_file(str(out / "part-0.parquet"), parquet_bytes({"uri": ["a.png"]}))
    proc = run_until_marker(LOCAL_WRITER, str(out / "part-1.parquet"), marker=tmp_path / "staged")
    kill(proc)

    assert not (out / "part-1.parquet").exists()
    leftovers = [p.name for p in out.iterdir() if p.name != "part-0.parquet"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part-1.parquet.") and leftovers[0].endswith(".tmp")
    dataset = ds.dataset(str(out), format="parquet")  # 32 MiB of zeros would not parse
    assert [Path(f).name for f in dataset.files] == ["part-0.parquet"]
    assert dataset.to_table()["uri"].to_pylist() == ["a.png"]

    assert clean_staging(str(out)) == 1
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet"]
    assert clean_staging(str(out)) == 0


def test_clean_staging_removes_only_staging_files(tmp_path):
    names = [".a.parquet.0123456789abcdef0123456789abcdef.tmp", ".keep", "x.tmp", ".a.parquet.nothex.tmp", "a.parquet"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".b.parquet.fedcba9876543210fedcba9876543210.tmp").write_bytes(b"x")

    assert clean_staging(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:] + ["sub"])
    assert clean_staging(str(tmp_path), recursive=True) == 1
    assert clean_staging(str(tmp_path / "never-created")) == 0


def parquet_bytes(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


# --- S3 -------------------------------------------------------------------------------------


def test_s3_endpoint_and_credentials_come_from_the_environment(s3_bucket):
    # No storage_options: AWS_ENDPOINT_URL and the AWS_* keys set by the fixture are enough.
    uri = commit_file(f"{s3_bucket.url}/out/a.bin", b"payload")
    assert uri == f"{s3_bucket.url}/out/a.bin"
    assert read_bytes(uri) == b"payload"
    assert s3_bucket.fs().cat_file(f"{s3_bucket.name}/out/a.bin") == b"payload"


def test_s3_missing_object_is_an_image_read_error(s3_bucket):
    with pytest.raises(ImageReadError, match="not found"):
        read_bytes(f"{s3_bucket.url}/nothing.png", s3_bucket.storage_options)


def test_s3_commit_to_a_missing_bucket_is_a_storage_error(s3_bucket):
    missing = f"s3://segflow-no-such-bucket-{uuid.uuid4().hex[:8]}/a.bin"
    with pytest.raises(StorageError, match="never creates buckets"):
        commit_file(missing, b"x", storage_options=s3_bucket.storage_options)


S3_WRITER = """
import asyncio, json, sys
import s3fs
import segflow.pipeline.storage as storage
url, options, marker = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe_file, call_s3 = s3fs.S3FileSystem._pipe_file, s3fs.S3FileSystem._call_s3

async def small_parts(self, path, data, chunksize=None, **kw):  # 5 MiB parts: multipart from 10 MiB
    return await pipe_file(self, path, data, chunksize=5 << 20, **kw)

async def stall_after_a_part(self, method, *args, **kw):
    out = await call_s3(self, method, *args, **kw)
    if method == "upload_part":  # parts are stored; CompleteMultipartUpload has not been sent
        open(marker, "w").close()
        await asyncio.sleep(600)
    return out

s3fs.S3FileSystem._pipe_file, s3fs.S3FileSystem._call_s3 = small_parts, stall_after_a_part
storage.commit_file(url, b"\\0" * (12 << 20), storage_options=options)
"""


def test_killed_s3_multipart_upload_leaves_no_visible_object(s3_bucket, tmp_path):
    url = f"{s3_bucket.url}/masks/part-1.parquet"
    proc = run_until_marker(S3_WRITER, url, json.dumps(s3_bucket.storage_options), marker=tmp_path / "uploading")
    kill(proc)

    fs = s3_bucket.fs()
    uploads = fs.list_multipart_uploads(s3_bucket.name)
    assert [u["Key"] for u in uploads] == ["masks/part-1.parquet"]  # it really was mid-multipart
    assert not fs.exists(f"{s3_bucket.name}/masks/part-1.parquet")
    assert fs.find(s3_bucket.name) == []


def test_s3_reads_and_commits_ride_out_503s(s3_bucket, s3_faults):
    options = s3_faults.storage_options()
    s3_faults.fail_next(2)
    commit_file(f"{s3_bucket.url}/a.bin", b"payload", storage_options=options)
    s3_faults.fail_next(2)
    assert read_bytes(f"{s3_bucket.url}/a.bin", options) == b"payload"
    assert s3_faults.failed == 4


def test_s3_down_for_good_is_a_storage_error_naming_the_url(s3_bucket, s3_faults):
    options = s3_faults.storage_options()
    commit_file(f"{s3_bucket.url}/a.bin", b"payload", storage_options=options)
    s3_faults.stop()
    with pytest.raises(StorageError) as info:
        read_bytes(f"{s3_bucket.url}/a.bin", options)
    assert f"{s3_bucket.url}/a.bin: storage still failing after 5 attempts" in str(info.value)
    assert "EndpointConnectionError" in str(info.value)


def test_retries_ride_out_an_s3_server_restart(s3_server, s3_bucket):
    fs, _ = filesystem_for(s3_bucket.url, s3_options(s3_server.endpoint_url, config_kwargs={
        "retries": {"total_max_attempts": 1}, "connect_timeout": 2}))
    s3_server.stop()  # moto forgets the bucket: recreating it works only once the server is back
    restart = threading.Timer(0.5, s3_server.start)
    restart.start()
    try:
        with_retries(fs.mkdir, s3_bucket.name, what=s3_bucket.url, attempts=10, base_delay=0.1)
    finally:
        restart.join()
    assert commit_file((fs, f"{s3_bucket.name}/a.bin"), b"back") == f"{s3_bucket.url}/a.bin"
    assert read_bytes(f"{s3_bucket.url}/a.bin", s3_bucket.storage_options) == b"back"
