"""One writer per OUTPUT, held by the engine itself: every run, repair or prune that writes OUTPUT.

`output_lock(output)` is what `job.run_segment`, the flows (`flows/locking.py`, inside their
Prefect concurrency slot when a server is configured) and `segflow verify --repair` hold
while they list staging files, rewrite shards and commit. Two kinds, chosen by the store:

- **Local disk**: an exclusive `flock` through the `filelock` package on a lock file named
  after the canonical OUTPUT (`/data/out`, `/data/out/` and `file:///data/out` are one
  location) in a lock folder on this machine (`$SEGFLOW_LOCK_DIR`, else
  `<tmp>/segflow-locks`). The kernel releases it when the holder ends, however it ends
  (SIGKILL included), so nothing stale is left. It orders writers on this machine only.
- **Object stores** (S3 and others): a lease object `OUTPUT/_segflow.lock` (JSON: holder,
  token, expiry) created with a conditional PUT (`If-None-Match: *`, s3fs `mode="create"`),
  which the store lets exactly one writer create. It is valid for `LEASE_SECONDS`, renewed
  by a background thread every third of that, and deleted on release. A holder killed
  without releasing blocks the OUTPUT until the lease expires; then the next writer deletes
  it and creates its own (at once when the holder ran on this machine and its process is
  gone, SIGKILL included). Guarantee: on a store with conditional PUTs (AWS S3 since 2024,
  MinIO, moto, fsspec's memory store) two live writers never both hold the lease, across
  machines. Taking over an *expired* lease (delete, then create) is not atomic: two writers
  that both find the same expired lease can both delete, and only one create succeeds,
  unless the second delete lands between the first writer's create and its first
  renewal; that needs a holder dead for `LEASE_SECONDS` and two new writers within the
  same instant. On a store without conditional PUTs, creation is check-then-put and the
  guarantee weakens to "probably": use a Prefect server's concurrency slot there (the
  flows take one).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import filelock
from fsspec.implementations.local import LocalFileSystem

from segflow.errors import ConfigError, SegflowError
from segflow.pipeline.storage import filesystem_for, is_transient, redact, to_uri, with_retries

log = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
LEASE_NAME = "_segflow.lock"  # leading "_": pyarrow.dataset never reads it
LOCK_PREFIX = "segflow-output-"


class OutputBusyError(SegflowError):
    """Another run holds the OUTPUT's lock and did not release it in time."""


def canonical_output(output: str, storage_options: dict | None = None) -> str:
    """The location as one string however it was written (`storage.to_uri`: absolute, no trailing slash).

    Without the driver for its protocol (gcsfs on a machine that only schedules), the
    URL as given, less any trailing slash.
    """
    try:
        return to_uri(*filesystem_for(output, storage_options)).rstrip("/") or "/"
    except ConfigError:
        return output.rstrip("/")


def lock_name(output: str, storage_options: dict | None = None) -> str:
    """A name for OUTPUT's lock: a hash of the canonical location plus its last segment, for people."""
    canonical = canonical_output(output, storage_options)
    tail = "".join(c if c.isalnum() or c in "-_." else "-" for c in canonical.rsplit("/", 1)[-1])[:40]
    return f"{LOCK_PREFIX}{hashlib.sha256(canonical.encode()).hexdigest()[:16]}-{tail}".rstrip("-")


@contextlib.contextmanager
def output_lock(output: str, storage_options: dict | None = None, timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold OUTPUT's lock for the block; yields where it lives (the lock file, or the lease's URL).

    `timeout_seconds`: how long to wait for another writer; None waits as long as it
    takes. Says once, at warning level, whom it waits for. Raises OutputBusyError on timeout.
    """
    fs, _ = filesystem_for(output, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _machine_lock(output, storage_options, timeout_seconds) as where:
            yield where
    else:
        with _lease(output, fs, timeout_seconds) as where:
            yield where


def machine_lock_dir() -> Path:
    """Where machine locks live: $SEGFLOW_LOCK_DIR, else `segflow-locks` in the temp folder.

    Shared by every user (sticky and world-writable, like /tmp itself), so that two users
    writing one OUTPUT see each other's lock.
    """
    configured = os.environ.get("SEGFLOW_LOCK_DIR")
    folder = Path(configured) if configured else Path(tempfile.gettempdir()) / "segflow-locks"
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        if not configured:
            with contextlib.suppress(OSError):  # someone else's folder: theirs to set
                folder.chmod(0o1777)
    return folder


@contextlib.contextmanager
def _machine_lock(output: str, storage_options: dict | None, timeout_seconds: float | None) -> Iterator[str]:
    """filelock's flock on OUTPUT's lock file; the holder's pid goes to a file beside it.

    Not into the lock file itself: filelock truncates it on every attempt to lock.
    """
    path = machine_lock_dir() / f"{lock_name(output, storage_options)}.lock"
    holder_file = path.with_suffix(".holder")
    lock = filelock.FileLock(str(path), mode=0o666)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _read_holder(holder_file)
        if timeout_seconds is not None and timeout_seconds <= 0:
            raise _busy(output, f"{holder} on this machine", str(path), timeout_seconds) from None
        log.warning("another segflow run%s on this machine is writing %s; waiting for it to end", holder, redact(output))
        try:
            lock.acquire(timeout=-1 if timeout_seconds is None else timeout_seconds)
        except filelock.Timeout:
            raise _busy(output, f"{_read_holder(holder_file)} on this machine", str(path), timeout_seconds) from None
    try:
        with contextlib.suppress(OSError):  # another user's folder entry: the lock still holds
            holder_file.write_text(f"{os.getpid()}\n")
        yield str(path)
    finally:
        lock.release()


@contextlib.contextmanager
def _lease(output: str, fs, timeout_seconds: float | None) -> Iterator[str]:
    url = f"{output.rstrip('/')}/{LEASE_NAME}"
    _, path = filesystem_for(url)
    token = uuid.uuid4().hex
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    announced = False
    while True:
        if _create_lease(fs, path, url, token, holder):
            break
        current = _read_lease(fs, path, url)
        if current is None:
            continue  # released meanwhile: try again at once
        if current.get("expires", 0) < time.time() or _dead_here(current):
            log.warning("%s: taking over the lease of %s (expired at %s, or its process on this machine is gone)",
                        redact(url), current.get("holder"), _when(current.get("expires")))
            with contextlib.suppress(FileNotFoundError):
                with_retries(fs.rm_file, path, what=url)
            continue
        who = f" ({current.get('holder')}, lease until {_when(current.get('expires'))})"
        if deadline is not None and time.monotonic() >= deadline:
            raise _busy(output, who, url, timeout_seconds)
        if not announced:
            log.warning("another segflow run%s is writing %s; waiting for it to end", who, redact(output))
            announced = True
        time.sleep(min(2.0, max(0.05, deadline - time.monotonic())) if deadline is not None else 2.0)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(fs, path, url, token, holder, stop), name="segflow-lease", daemon=True)
    renewer.start()
    try:
        yield url
    finally:
        stop.set()
        renewer.join()
        current = _read_lease(fs, path, url)
        if current is not None and current.get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                with_retries(fs.rm_file, path, what=url)


def _lease_body(token: str, holder: str) -> bytes:
    return json.dumps({"token": token, "holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + LEASE_SECONDS}).encode()


def _dead_here(lease: dict) -> bool:
    """Whether the lease's holder ran on this machine and its process is gone (killed): no need to wait for expiry."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _create_lease(fs, path: str, url: str, token: str, holder: str) -> bool:
    """Create the lease object only if it does not exist (a conditional PUT); -> whether we did."""
    try:
        with_retries(fs.pipe_file, path, _lease_body(token, holder), mode="create", what=url)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # s3fs reports a failed If-None-Match (412 PreconditionFailed) as an OSError
        if is_transient(e):
            raise
        if _read_lease(fs, path, url) is not None:
            return False
        raise
    except TypeError:  # a filesystem without `mode`: check, then put (see the module docstring)
        if _read_lease(fs, path, url) is not None:
            return False
        with_retries(fs.pipe_file, path, _lease_body(token, holder), what=url)
        return True


def _read_lease(fs, path: str, url: str) -> dict | None:
    try:
        fs.invalidate_cache(path)
        return json.loads(with_retries(fs.cat_file, path, what=url))
    except FileNotFoundError:
        return None
    except ValueError:  # not ours, or half a write from a store without atomic PUTs: treat as held, briefly
        return {"holder": "an unreadable lease", "expires": time.time() + 1}


def _renew(fs, path: str, url: str, token: str, holder: str, stop: threading.Event) -> None:
    """Push the expiry forward every LEASE_SECONDS / 3 while the lease is still ours."""
    while not stop.wait(LEASE_SECONDS / 3):
        try:
            current = _read_lease(fs, path, url)
            if current is None or current.get("token") != token:
                log.error("%s: the lease was lost (expired and taken by %s); this run no longer excludes others",
                          redact(url), (current or {}).get("holder", "nobody"))
                return
            with_retries(fs.pipe_file, path, _lease_body(token, holder), what=url)
        except Exception as e:  # noqa: BLE001 - keep renewing; the next attempt may get through
            log.warning("%s: could not renew the lease (%s)", redact(url), redact(f"{type(e).__name__}: {e}"))


def _busy(output: str, holder: str, where: str, timeout_seconds: float | None) -> OutputBusyError:
    return OutputBusyError(
        f"{redact(output)}: another segflow run{holder} is writing this output (lock {redact(where)!r} still held after "
        f"{timeout_seconds or 0:g} s); wait for it, or raise wait_for_output_seconds"
    )


def _read_holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""


def _when(epoch) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(epoch), _dt.timezone.utc).strftime("%H:%M:%S UTC")
    except (TypeError, ValueError):
        return "?"
