"""Model actors started before the job is planned, so that their start overlaps the flow's.

A model actor's start is a fresh Python process importing torch and loading the network:
~3 CPU-seconds, the largest part of the time to the first committed shard after Ray's
own start. Started when the shards are planned, it waits for Prefect's temporary server,
the flow run's creation, listing and planning to finish first; started as soon as the
local Ray is up, it runs beside them. Actors depend only on an `engine.ActorSpec` (model,
inference options, cluster plan, storage access), never on the plan, so the job takes
them over if its own spec turns out equal, and stops them otherwise.

`begin` is called by the CLI once the model is known to load (a bad model must give its
one-line error, not an actor's traceback); `take` by the job when it runs its shards.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Callable

from segflow.pipeline.engine import ActorSpec, start_model_actors

log = logging.getLogger(__name__)

_started: Future | None = None  # -> (ActorSpec, actors), or None when the early start did not happen


def begin(spec_for_cluster: Callable[[], ActorSpec], ray_is_up: Callable[[], None]) -> Future:
    """Start model actors in a helper thread once `ray_is_up()` returns with Ray connected.

    `spec_for_cluster` builds the spec then (it needs the connected cluster's resources).
    Any failure leaves nothing started: the job starts its actors itself and reports it.
    Returns the start's future: (spec, actors), or None.
    """
    global _started
    started: Future = Future()
    _started = started

    def start() -> None:
        try:
            ray_is_up()
            import ray

            if not ray.is_initialized():
                started.set_result(None)
                return
            spec = spec_for_cluster()
            started.set_result((spec, start_model_actors(spec)))
        except Exception:  # noqa: BLE001 - the job builds the spec again and reports the error
            started.set_result(None)

    threading.Thread(target=start, name="model-actors-prestart", daemon=True).start()
    return started


def take(spec: ActorSpec) -> list | None:
    """The actors started early for an equal spec (once), or None; actors for another spec are stopped."""
    global _started
    started, _started = _started, None
    if started is None:
        return None
    early = started.result()
    if early is None:
        return None
    early_spec, actors = early
    if early_spec == spec:
        log.debug("using %d model actors started before the plan", len(actors))
        return actors
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    return None
