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

Inside the slot, and without a Prefect server on its own, the flow holds the engine's
own lock (`segflow.pipeline.lock.output_lock`), the one `job.run_segment` and `segflow
verify --repair` hold too: an flock on this machine for local outputs (released by the
kernel however the holder ends), a lease object created with a conditional PUT on object
stores. Without a server (no PREFECT_API_URL: an ephemeral API runs no repossessor, so a
slot left by a killed run would lock its OUTPUT forever) that lock is the only one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from segflow.pipeline import lock
from segflow.pipeline.lock import OutputBusyError, machine_lock_dir  # noqa: F401 - part of this module's API

LEASE_SECONDS = 300.0
LIMIT_PREFIX = lock.LOCK_PREFIX

logger = logging.getLogger(__name__)


def canonical_output(output: str) -> str:
    """The location as one string however it was written (see `segflow.pipeline.lock.canonical_output`)."""
    return lock.canonical_output(output)


def output_limit_name(output: str) -> str:
    """The global concurrency limit for this OUTPUT: the engine lock's name (limit names may not contain "/")."""
    return lock.lock_name(output)


def prefect_server_configured() -> bool:
    """True when runs report to a real Prefect server rather than an in-process ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def output_lock(output: str, timeout_seconds: float | None = None, storage_options: dict | None = None) -> Iterator[str]:
    """Hold OUTPUT's slot for the duration of the block; yields the limit's name (the lock file's path without a server).

    `timeout_seconds`: how long to wait for another run to finish; None waits as long
    as it takes (a nightly run queued behind a slow one). Raises OutputBusyError on timeout.
    """
    if not prefect_server_configured():
        with lock.output_lock(output, storage_options, timeout_seconds) as where:
            yield where
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
            # the engine's lock too, against library callers of run_segment and verify --repair
            with lock.output_lock(output, storage_options, timeout_seconds):
                yield name
    except TimeoutError:
        raise OutputBusyError(
            f"{output}: another segflow run is writing this output (lock {name!r} still held after {timeout_seconds:g} s); "
            "wait for it, or raise wait_for_output_seconds"
        ) from None


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
