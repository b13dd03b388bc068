"""The Ray driver: feeds shards to model actors, images to CRF workers, commits shards.

A shard's journey: the driver hands it to a model actor (`ModelWorker.infer_shard`, a
streaming generator); each image the actor yields goes straight to a CRF task
(`refine_item`) without passing through the driver; when every image of the shard has
its row, the driver commits the shard's Parquet files. On CPU-only clusters the model
actors refine their own images (`ClusterPlan.crf_workers == 0`, see cluster.py) and
yield the rows themselves; the driver then collects them directly.

At most `max_in_flight` shards are open at once, which bounds the decoded images and
logits in the object store however large the collection. A shard whose actor dies, or
whose refinement fails unexpectedly, is retried whole (actors restart on their own); one
that fails `max_attempts` times becomes error rows that blame the run, not the images
(`image_fault` false: a rerun tries them again), and the job goes on. Two failures stop
the job instead, since they say nothing about the images and would fail every shard:
storage failing, and a worker that cannot start (a model actor whose constructor raises,
a refinement worker that cannot import). No error rows are written for images never
tried; committed shards stay and a rerun resumes. After a failure its actor gets no new
shard until it answers a readiness probe, so a restarting actor cannot burn the attempts
of the shards that follow.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from segflow.pipeline.cluster import ClusterPlan
from segflow.pipeline.commit import commit_shard
from segflow.pipeline.config import ModelRef
from segflow.errors import JobStoppedError, StorageError
from segflow.pipeline.inference import InferenceOptions, ModelWorker
from segflow.pipeline.refine import RefineContext, refine_item, warm_up
from segflow.pipeline.shard_failure import MEMORY_FIX, Attempt, ShardHistory, worker_deaths_since
from segflow.pipeline.sharding import Shard

log = logging.getLogger(__name__)


@dataclass
class ExecutionStats:
    """What running the shards produced (counts and timings)."""

    masks: int = 0
    errors: int = 0
    errors_to_retry: int = 0  # error rows not of the image's making (image_fault false)
    shards_committed: int = 0
    shard_retries: int = 0
    pruned: int = 0
    seconds: float = 0.0
    seconds_to_first_commit: float | None = None
    stage_seconds: dict = field(default_factory=dict)


def next_actor(load: list[int], usable: list[int], waiting: int) -> int | None:
    """The actor the next shard goes to, or None to hold it back for now.

    `load[a]`: shards open on actor a; `usable`: actors that may get one; `waiting`: shards
    not yet sent, this one included. Each actor holds up to two shards (the executor's
    in-flight cap), so that it never waits for the driver between them; the next goes to
    the one holding fewest. The last shards (no more of them than actors) are held back
    until an actor is idle: queued behind another, the last one would keep its actor
    working alone while the others had nothing left. `python bench/dispatch_sim.py`
    simulates this dispatch: on 2 actors and 200 images the tail cost 3.7 % of the ideal
    finish time without the hold and 0.2 % with it (40 seeds); no size or actor count
    tried (2 to 8 actors, 40 to 2,000 images) does worse with it.
    """
    if waiting <= len(usable):
        usable = [a for a in usable if load[a] == 0]
    return min(usable, key=load.__getitem__) if usable else None


@dataclass
class _OpenShard:
    shard: Shard
    attempt: int
    actor: int
    generator: object = None
    generator_done: bool = False
    started_ms: float = field(default_factory=lambda: time.time() * 1000)
    refining: set = field(default_factory=set)
    masks: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    metrics: list = field(default_factory=list)


_STAGE_COLUMNS = ("seconds_read", "seconds_decode", "seconds_infer", "seconds_refine", "seconds_encode")


@dataclass(frozen=True)
class ActorSpec:
    """What the model actors are built from: the model, how it runs, where they run, storage access.

    Nothing here depends on the plan, so the actors can start before it exists
    (pipeline/prestart.py); two equal specs give interchangeable actors.
    """

    model: ModelRef
    inference: InferenceOptions
    cluster: ClusterPlan
    storage_options: dict | None = field(default=None, repr=False)
    storage_env: dict | None = field(default=None, repr=False)  # the driver's `storage.storage_environment()`


def start_model_actors(spec: ActorSpec) -> list:
    """Create the model actors (`cluster.model_actors` of them); each loads its network in the background."""
    import ray

    actor_class = ray.remote(ModelWorker).options(
        num_cpus=spec.cluster.model_num_cpus,
        num_gpus=spec.cluster.model_num_gpus,
        max_restarts=-1,
        max_task_retries=0,  # segflow retries whole shards itself
        scheduling_strategy="SPREAD",
    )
    return [actor_class.remote(spec.model, spec.inference, spec.storage_options, spec.storage_env) for _ in range(spec.cluster.model_actors)]


class ShardExecutor:
    """Runs shards to completion on a connected Ray cluster."""

    def __init__(
        self,
        spec: ActorSpec,
        refine_context: RefineContext,
        output: str,
        file_metadata: dict,
        max_in_flight: int | None = None,
        max_attempts: int = 3,
        actors: list | None = None,
        replacer=None,
    ):
        """`actors`: model actors already started from `spec` (`start_model_actors`); by default it starts them.

        `replacer` (a `history.Replacer`): commits each shard so that the rows it supersedes
        stay current until it has committed, then move to OUTPUT/history/.
        """
        import ray

        self._ray = ray
        cluster = spec.cluster
        self.actors = actors if actors is not None else start_model_actors(spec)
        # A kind that refines on the device does so in the model actor, which then makes the
        # whole row there: its probabilities never cross the object store.
        on_device = getattr(refine_context.refiner, "runs_on", "cpu") == "device"
        self.refine_in_actors = cluster.crf_workers == 0 or on_device
        self._probes: list = [None] * len(self.actors)  # per actor: readiness probe in flight after a failure
        self._refine_item = ray.remote(refine_item)
        self._refine_options = {"num_cpus": cluster.crf_num_cpus, "max_retries": 3}
        # start CRF worker processes (and their torch import) while the model actors load
        warm = ray.remote(warm_up).options(num_cpus=cluster.crf_num_cpus)
        self._warming = [warm.remote() for _ in range(0 if self.refine_in_actors else cluster.crf_workers)]
        self.context = ray.put(refine_context)
        self.evaluating = refine_context.evaluation is not None
        self.output = output
        self.file_metadata = file_metadata
        self.storage_options = spec.storage_options
        self.max_in_flight = max_in_flight or 2 * cluster.model_actors
        self.max_attempts = max_attempts
        self.replacer = replacer
        self._histories: dict[str, ShardHistory] = {}  # shard id -> its failed attempts, while it is retried

    def run(self, shards: list[Shard], on_progress: Callable[[int], None] | None = None) -> ExecutionStats:
        """Process every shard; each ends committed, with masks and/or error rows for all its images.

        `on_progress(n)` is called as images finish (a retried shard's images count again).
        Raises StorageError when a shard's last attempt failed because storage did (an
        outage, missing credentials), and JobStoppedError at the first shard that failed
        because a worker cannot start (`_worker_start_failure`): such failures say nothing
        about the images, so they get no error rows; committed shards stay, and a rerun resumes.
        """
        stats = ExecutionStats(stage_seconds={c: 0.0 for c in _STAGE_COLUMNS})
        self._on_progress = on_progress or (lambda n: None)
        start = time.perf_counter()
        waiting: deque[tuple[Shard, int]] = deque((s, 1) for s in shards)
        open_shards: dict[str, _OpenShard] = {}
        while waiting or open_shards:
            while waiting and len(open_shards) < self.max_in_flight and (actor := self._next_actor(open_shards, len(waiting))) is not None:
                shard, attempt = waiting.popleft()
                open_shards[shard.shard_id] = self._open(shard, attempt, actor)
            for sid in self._wait_and_advance(open_shards, waiting, stats):
                done = open_shards.pop(sid)
                self._histories.pop(sid, None)
                self._commit(done, stats)
                if stats.seconds_to_first_commit is None:
                    stats.seconds_to_first_commit = time.perf_counter() - start
        stats.seconds = time.perf_counter() - start
        return stats

    def shutdown(self) -> None:
        """Kill this run's model actors now, whatever the run's outcome.

        A failed run's exception keeps this executor, and so its actor handles, referenced
        (its traceback, a flow's retry state): until killed, the actors would keep their
        CPUs and GPUs, and a retry in the same process would wait for them forever.
        """
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already dead
                self._ray.kill(actor, no_restart=True)

    def actor_pids(self) -> list[int]:
        return self._ray.get([a.pid.remote() for a in self.actors])

    def _next_actor(self, open_shards: dict, waiting: int) -> int | None:
        load = [0] * len(self.actors)
        for o in open_shards.values():
            load[o.actor] += 1
        return next_actor(load, self._usable_actors(), waiting)

    def _open(self, shard: Shard, attempt: int, actor: int) -> _OpenShard:
        # Tasks are named after their shard: `ps`, `ray list tasks` and the dashboard then show
        # which shard each model actor and CRF worker is on (a process title reads
        # "ray::infer_shard shard-<id>").
        in_actor = self.context if self.refine_in_actors else None
        generator = self.actors[actor].infer_shard.options(name=f"infer_shard shard-{shard.shard_id}").remote(shard, in_actor)
        return _OpenShard(shard=shard, attempt=attempt, actor=actor, generator=generator)

    def _wait_and_advance(self, open_shards: dict[str, _OpenShard], waiting: deque, stats: ExecutionStats) -> list[str]:
        """Wait for progress; route model output to CRF tasks, collect rows; return finished shard ids."""
        ray = self._ray
        owner = {}
        for sid, o in open_shards.items():
            if not o.generator_done:
                owner[o.generator] = sid
            for ref in o.refining:
                owner[ref] = sid
        probes = {ref: actor for actor, ref in enumerate(self._probes) if ref is not None}
        if not owner:
            finished = [sid for sid, o in open_shards.items() if o.generator_done and not o.refining]
            if finished or not probes:
                return finished
        refs = [*owner, *probes]
        ready, _ = ray.wait(refs, num_returns=1, timeout=10.0)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        failed: dict[str, BaseException] = {}
        for ref in ready:
            if ref not in owner:
                self._probe_answered(probes[ref])
                continue
            sid = owner[ref]
            o = open_shards[sid]
            if sid in failed:
                continue
            try:
                if ref is o.generator:
                    self._advance_generator(o)
                else:
                    o.refining.discard(ref)
                    self._collect(o, ray.get(ref), stats)
            except StopIteration:
                o.generator_done = True
            except Exception as exc:  # actor died, worker crashed, object lost: retry the shard
                failed[sid] = exc
        for sid, exc in failed.items():
            self._fail(open_shards.pop(sid), exc, waiting, stats)
        return [sid for sid, o in open_shards.items() if o.generator_done and not o.refining]

    def _advance_generator(self, o: _OpenShard) -> None:
        item_ref = next(o.generator)
        if self.refine_in_actors:  # the item is already the image's rows: collect it like a CRF result
            o.refining.add(item_ref)
            return
        refine = self._refine_item.options(name=f"refine_item shard-{o.shard.shard_id}", **self._refine_options)
        o.refining.add(refine.remote(item_ref, self.context, o.shard.shard_id))

    def _collect(self, o: _OpenShard, result: dict, stats: ExecutionStats) -> None:
        self._on_progress(1)
        if "mask" in result:
            o.masks.append(result["mask"])
            for column in _STAGE_COLUMNS:
                stats.stage_seconds[column] += result["mask"].get(column) or 0.0
        if "error" in result:
            o.errors.append(result["error"])
            if o.shard.shard_id in self._histories:
                self._histories[o.shard.shard_id].keep_if_own(result["error"])
        if "metrics" in result:
            o.metrics.append(result["metrics"])

    def _fail(self, o: _OpenShard, exc: BaseException, waiting: deque, stats: ExecutionStats) -> None:
        for ref in o.refining:
            try:
                self._ray.cancel(ref)
            except Exception:
                pass
        cannot_start = _worker_start_failure(exc)
        if cannot_start is not None:
            # Every attempt of every shard would fail the same way (a failed constructor is not
            # retried by Ray), and error rows would blame images that were never tried.
            raise JobStoppedError(f"{cannot_start}; no image was recorded as failed: fix the cause and rerun "
                                  "(committed shards are kept)") from None
        outage = _storage_failure(exc)
        if outage is not None:
            # The store failed, not the images: error rows would mark them done, and a rerun
            # after the outage would skip them. Stop; committed shards stay, a rerun resumes.
            # At once: storage.with_retries already retried the call (the one retry layer).
            raise StorageError(" ".join(str(outage).split())) from None
        self._probe(o.actor)
        reason = _failure_reason(exc)
        history = self._histories.setdefault(o.shard.shard_id, ShardHistory())
        # The model actor answers in shard order: it was on the first image without a result.
        answered = {r["uri"] for r in (*o.masks, *o.errors)}
        on_image = next((u for u in o.shard.uris if u not in answered), None)
        history.attempts.append(Attempt(reason, f"{_all_text(exc)}\n{worker_deaths_since(o.started_ms)}", on_image))
        for row in o.errors:
            history.keep_if_own(row)
        memory = history.memory()
        if memory is not None:
            log.warning("shard %s attempt %d: out of memory on %s: %s", o.shard.shard_id, o.attempt, on_image, memory[0])
        if o.attempt < self.max_attempts:
            log.warning("shard %s attempt %d failed (%s); retrying", o.shard.shard_id, o.attempt, reason)
            stats.shard_retries += 1
            waiting.appendleft((o.shard, o.attempt + 1))
            return
        log.error("shard %s failed %d times; recording its unfinished images as errors", o.shard.shard_id, o.attempt)
        if memory is not None:
            log.error("out of memory on %s: %s", ", ".join(sorted(memory[1])) or "an image", MEMORY_FIX)
        finished = {r["uri"] for r in o.masks}
        o.metrics = [r for r in o.metrics if r["uri"] in finished]
        base = {"shard_id": o.shard.shard_id, **self._fingerprints()}
        o.errors = history.error_rows(o.shard.uris, o.shard.keys, finished, base)
        del self._histories[o.shard.shard_id]
        self._commit(o, stats)

    def _usable_actors(self) -> list[int]:
        return [i for i, probe in enumerate(self._probes) if probe is None]

    def _probe(self, actor: int) -> None:
        """Hold new shards back from `actor` until it answers again.

        A failed shard has often lost its actor. Ray restarts the actor, but calls made before
        the caller has learnt of the death fail at once (ActorUnavailableError), so a shard
        sent there straight away would fail without running, burning an attempt of every shard
        sent in that window. The probe is a call Ray itself retries until the actor is back.
        """
        if self._probes[actor] is None:
            self._probes[actor] = self.actors[actor].pid.options(max_task_retries=-1).remote()

    def _probe_answered(self, actor: int) -> None:
        try:
            self._ray.get(self._probes[actor])
        except Exception as exc:  # dead for good: its shards will fail and end as error rows
            log.error("model actor %d does not come back (%s)", actor, type(exc).__name__)
        self._probes[actor] = None

    def _fingerprints(self) -> dict:
        return {k: self.file_metadata.get(k) for k in ("job_fingerprint", "model_fingerprint", "crf_fingerprint")}

    def _commit(self, o: _OpenShard, stats: ExecutionStats) -> None:
        accounted = {r["uri"] for r in o.masks} | {r["uri"] for r in o.errors}
        missing = [(u, k) for u, k in zip(o.shard.uris, o.shard.keys) if u not in accounted]
        for uri, key in missing:  # defensive: the invariant is every input in exactly one of masks or errors
            o.errors.append({"uri": uri, "key": key, "shard_id": o.shard.shard_id, "stage": "shard", "attempts": o.attempt,
                             "reason": "no result came back for this image", "image_fault": False, **self._fingerprints()})
        def write(masks: list, errors: list, metrics: list | None) -> None:
            commit_shard(self.output, o.shard.shard_id, masks, errors, metrics, self.file_metadata, self.storage_options)

        metrics = o.metrics if self.evaluating else None
        if self.evaluating:  # which label content each score (or refusal) was made against: evaluation/rescore.py
            label_keys = dict(zip(o.shard.uris, o.shard.label_keys or [None] * len(o.shard)))
            for row in [*o.metrics, *(r for r in o.errors if r.get("stage") == "label")]:
                row["label_key"] = label_keys.get(row["uri"])
        if self.replacer is not None:
            self.replacer.commit(o.shard.shard_id, o.masks, o.errors, metrics, write)
        else:
            write(o.masks, o.errors, metrics)
        stats.masks += len(o.masks)
        stats.errors += len(o.errors)
        stats.errors_to_retry += sum(1 for r in o.errors if not r["image_fault"])
        stats.shards_committed += 1


def _storage_failure(exc: BaseException) -> StorageError | None:
    """The StorageError behind a failed shard (Ray wraps a worker's in RayTaskError), or None."""
    cause = getattr(exc, "cause", exc)  # a ray.exceptions.RayTaskError holds the worker's exception
    return cause if isinstance(cause, StorageError) else None


def _worker_start_failure(exc: BaseException) -> str | None:
    """One line naming why a worker cannot start, when that is why a shard failed; else None.

    Two cases, both deterministic and neither about an image: a model actor whose
    constructor raised (Ray delivers an ActorDiedError with `actor_init_failed`, holding
    the constructor's traceback as text, maybe inside the RayTaskError of a CRF task that
    needed its output), and an ImportError in a model actor or a refinement task (its
    environment lacks a module, or imports someone else's package of the same name).
    """
    from ray.exceptions import RayActorError

    for error in (exc, getattr(exc, "cause", None)):
        if isinstance(error, RayActorError) and getattr(error, "actor_init_failed", False):
            return f"a model actor cannot start: {_last_exception_line(str(error))}"
        if isinstance(error, ImportError):
            cause = getattr(error, "cause", error)
            return f"a worker cannot import what it needs: {type(cause).__name__}: {_first_line(str(cause))}"
    return None


def _last_exception_line(traceback_text: str) -> str:
    """`Type: message` at the end of a traceback's text (what a constructor raised)."""
    lines = [line for line in _ANSI_ESCAPE.sub("", traceback_text).splitlines() if line.strip()]
    start = max((i for i, line in enumerate(lines) if line[:1].isspace()), default=-1) + 1
    return " ".join(line.strip() for line in lines[start:])[:_REASON_MAX] or "unknown cause"


def _first_line(text: str) -> str:
    text = _ANSI_ESCAPE.sub("", text).strip()
    return text.splitlines()[0] if text else ""


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_REASON_MAX = 300


def _all_text(exc: BaseException) -> str:
    """Everything Ray says about a failure: the wrapper and its cause (a worker's exit detail lives in either)."""
    cause = getattr(exc, "cause", None)
    return _ANSI_ESCAPE.sub("", f"{exc}\n{cause if cause is not None else ''}")


def _failure_reason(exc: BaseException) -> str:
    """`Type: first line` of why a shard attempt failed, for logs and its error rows.

    Ray delivers a dead actor or worker as a RayTaskError of the CRF task that needed its
    output, whose text is only a coloured task name; the cause inside says what happened
    ("ActorDiedError: The actor died unexpectedly ...").
    """
    cause = getattr(exc, "cause", None) or exc
    text = _ANSI_ESCAPE.sub("", str(cause)).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:_REASON_MAX]
