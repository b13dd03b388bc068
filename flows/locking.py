"""One writer per OUTPUT: a Prefect global concurrency limit of 1 named after the location.

What guarantees it, and what does not:

- A deployment's `concurrency_limit` (set too, see `flows/deploy.py`) counts runs of
  *that deployment*. Two deployments, an ad-hoc `segment_flow` and a scheduled
  `reprocess_flow`, or a segment and an evaluate run into the same OUTPUT would not
  see each other.
- Tag-based concurrency limits apply to task runs, not flow runs.
- A global concurrency limit is a named counter on the Prefect server. Every segflow
  flow, whatever started it, takes one slot of `segflow-output-<hash of OUTPUT>` (limit
  1, created on first use) before it lists or writes anything, and gives it back when
  it ends. So at most one flow run writes a given OUTPUT at a time, across deployments,
  workers and machines that share the server. The OUTPUT is normalised first, so
  `/data/out`, `/data/out/` and `file:///data/out` are one location.

The slot is held under a lease that a background thread renews; if the process dies
without releasing it (SIGKILL, lost machine), the server's repossessor service frees it
when the lease expires (`LEASE_SECONDS`). If renewal fails for good, the run is stopped
rather than left writing without the lock (`raise_on_lease_renewal_failure=True`):
stopping is safe, because committed shards are kept and the next run resumes.

Without a Prefect server (no PREFECT_API_URL: Prefect starts a throwaway "ephemeral"
API inside the process, the CLI's default) there is no shared server to count on, and an
ephemeral API runs no repossessor, so a run killed while holding a slot would lock its
OUTPUT forever. There the lock is an exclusive `flock` on a file named like the limit, in
a lock folder on this machine (`machine_lock`): the kernel releases it when the process
ends, however it ends, so nothing stale is left. It keeps two runs on this machine (two
terminals, a cron job beside a person) from writing one OUTPUT at once; runs on other
machines writing the same OUTPUT need the shared Prefect server.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from segflow.errors import ConfigError, SegflowError
from segflow.pipeline.storage import filesystem_for, to_uri

LEASE_SECONDS = 300.0
LIMIT_PREFIX = "segflow-output-"

logger = logging.getLogger(__name__)


class OutputBusyError(SegflowError):
    """Another flow run holds the OUTPUT's lock and did not release it in time."""


def canonical_output(output: str) -> str:
    """The location as one string however it was written (`segflow.pipeline.storage.to_uri`: absolute, no trailing slash).

    Without the driver for its protocol (gcsfs on a machine that only schedules), the
    URL as given, less any trailing slash.
    """
    try:
        return to_uri(*filesystem_for(output)).rstrip("/") or "/"
    except ConfigError:
        return output.rstrip("/")


def output_limit_name(output: str) -> str:
    """The global concurrency limit for this OUTPUT.

    A hash, because limit names may not contain "/"; the last path segment is kept so
    that people can tell limits apart in the UI (`prefect gcl ls`).
    """
    canonical = canonical_output(output)
    tail = "".join(c if c.isalnum() or c in "-_." else "-" for c in canonical.rsplit("/", 1)[-1])[:40]
    return f"{LIMIT_PREFIX}{hashlib.sha256(canonical.encode()).hexdigest()[:16]}-{tail}".rstrip("-")


def prefect_server_configured() -> bool:
    """True when runs report to a real Prefect server rather than an in-process ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def output_lock(output: str, timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold OUTPUT's slot for the duration of the block; yields the limit's name (the lock file's path without a server).

    `timeout_seconds`: how long to wait for another run to finish; None waits as long
    as it takes (a nightly run queued behind a slow one). Raises OutputBusyError on timeout.
    """
    if not prefect_server_configured():
        with machine_lock(output, timeout_seconds) as path:
            yield path
        return

    from prefect.concurrency.sync import concurrency

    name = output_limit_name(output)
    ensure_output_limit(name)
    try:
        with concurrency(
            name,
            occupy=1,
            timeout_seconds=timeout_seconds,
            lease_duration=LEASE_SECONDS,
            strict=True,
            holder=_holder(),
            raise_on_lease_renewal_failure=True,
        ):
            yield name
    except TimeoutError:
        raise OutputBusyError(
            f"{output}: another segflow run is writing this output (lock {name!r} still held after {timeout_seconds:g} s); "
            "wait for it, or raise wait_for_output_seconds"
        ) from None


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
def machine_lock(output: str, timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold an exclusive flock on OUTPUT's lock file on this machine; yields the file's path.

    Waits for a holder (saying once who it is), up to `timeout_seconds` (None: as long as
    it takes), then raises OutputBusyError. The holder's pid is written into the file.
    """
    path = machine_lock_dir() / f"{output_limit_name(output)}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        writable = True
    except PermissionError:  # another user's lock file: locking needs only read access
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(path)
                if deadline is not None and time.monotonic() >= deadline:
                    raise OutputBusyError(
                        f"{output}: another segflow run{holder} on this machine is writing this output "
                        f"(lock {str(path)!r} still held after {timeout_seconds:g} s); wait for it, or raise wait_for_output_seconds"
                    ) from None
                if not announced:
                    _logger().warning("another segflow run%s on this machine is writing %s; waiting for it to end", holder, output)
                    announced = True
                time.sleep(0.2)
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield str(path)
    finally:
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""


def ensure_output_limit(name: str) -> None:
    """Create the limit with one slot, or put it back to one active slot if someone changed it.

    Resetting is deliberate: a limit of 2 or an inactive limit would silently let two
    writers in. To unstick a slot left by a crashed run on a server whose leases were
    lost (a restarted server with in-memory lease storage), use
    `prefect gcl update NAME --active-slots 0`, not a higher limit.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                return
            except ObjectAlreadyExists:  # another run created it between our read and create
                existing = client.read_global_concurrency_limit_by_name(name)
        if existing.limit != 1 or not existing.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines reach the Prefect UI), or this module's outside a run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _holder():
    """Who holds the slot, shown by the server: this flow run, when there is one."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None
