"""Why a shard failed, in words a user can act on, and the error rows it leaves.

A model actor that dies mid-shard ends that shard's attempt. The usual cause on big
images is memory: Ray's memory monitor, or the kernel's OOM killer, ends the actor while
it holds one image's activations. Ray says so only inside the first attempt's error (the
cause of a RayTaskError, as a worker exit detail); the next calls to the restarted actor
may see only `ActorUnavailableError`. Reporting the last attempt's exception type, as the
engine once did, turned "this 48 Mpx photo does not fit in memory" into "shard failed 3
times, last: ActorUnavailableError" on every image of the shard.

So every attempt is kept, with the image the actor was on when it died (the first image
of the shard it had not yet answered for: it answers in shard order), and when the last
attempt fails the shard's rows are:
- a mask for every image the last attempt finished (work already done is not thrown away);
- the image's own error row where any attempt produced one that blames the image (an empty
  file, an undecodable format): that reason is more useful than the shard's;
- for the image the actor died on, when memory was the cause: a reason naming memory and
  the fix;
- for the rest, not tried to the end: why the shard failed, and on which image.
None of the last two blames its image (`image_fault` false): a rerun retries them, after
the fix.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# Ray's worker exit details (Ray 2.60, _raylet.so / raylet strings). The memory monitor's
# kill is certain; a SIGKILL is reported with the OOM killer as its first likely cause.
_MEMORY_MONITOR = re.compile(r"NODE_OUT_OF_MEMORY|OutOfMemoryError|memory monitor|running out of memory|out of memory", re.I)
_OOM_KILLER = re.compile(r"OOM killer", re.I)

MEMORY_FIX = (
    "segment it at a smaller working size (--working-size 1024, or 512), or in tiles (--tiles 512,384), "
    "or give each model actor more memory (fewer --model-actors per node, or a larger node)"
)


def memory_cause(text: str) -> str | None:
    """How memory ended a worker, from Ray's text about its death; None when Ray names no memory cause."""
    if _MEMORY_MONITOR.search(text):
        return "Ray's memory monitor killed the model actor (the node ran out of memory)"
    if _OOM_KILLER.search(text):
        return "the model actor was killed (SIGKILL), most likely by the kernel's OOM killer (out of memory)"
    return None


def worker_deaths_since(start_ms: float, wait_s: float = 2.0) -> str:
    """Ray's exit details of the workers that died since `start_ms` (epoch ms), one per line; '' when none or unknown.

    When a model actor's process is killed, its caller usually gets only
    `ActorUnavailableError: ... Socket closed`; why the process ended (the raylet's "Worker
    exit detail", which names the memory monitor or the OOM killer) is kept in the GCS's
    worker table. The public reader of that table (`ray.util.state.list_workers`) needs the
    dashboard, which segflow's local Ray does not start, so this reads the table through
    the driver's GCS connection. The raylet reports a death shortly after the caller sees
    it: the table is asked again for up to `wait_s`.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            from ray._private.state import state
            from ray.core.generated import gcs_pb2

            rows = [gcs_pb2.WorkerTableData.FromString(b) for b in state._global_state_accessor.get_worker_table()]
        except Exception:  # noqa: BLE001 - an internal table: without it, the caller's own text is all there is
            return ""
        details = [w.exit_detail for w in rows if not w.is_alive and w.end_time_ms >= start_ms and w.exit_detail]
        if details or time.monotonic() >= deadline:
            return "\n".join(details)
        time.sleep(0.2)


@dataclass
class Attempt:
    reason: str  # `Type: first line` of what ended it
    cause_text: str  # everything Ray said about it, for recognising memory
    on_image: str | None  # the image the actor was on, None when it had answered for every image


@dataclass
class ShardHistory:
    """Everything one shard's attempts taught: their ends, and image-specific error rows."""

    attempts: list[Attempt] = field(default_factory=list)
    own_errors: dict[str, dict] = field(default_factory=dict)  # uri -> an error row that blames the image

    def keep_if_own(self, row: dict) -> None:
        if row.get("image_fault"):
            self.own_errors.setdefault(row["uri"], row)

    def memory(self) -> tuple[str, set[str]] | None:
        """(how memory ended the actor, the images it died on) when any attempt names memory; else None."""
        causes = [(memory_cause(a.cause_text), a.on_image) for a in self.attempts]
        named = [(cause, image) for cause, image in causes if cause is not None]
        if not named:
            return None
        certain = next((c for c, _ in named if c.startswith("Ray's")), named[0][0])
        return certain, {image for _, image in named if image is not None}

    def error_rows(self, uris, keys, finished: set[str], base: dict) -> list[dict]:
        """Rows for the shard's images that have no mask after its last attempt (see the module docstring)."""
        attempts = len(self.attempts)
        last = self.attempts[-1] if self.attempts else Attempt("unknown", "", None)
        memory = self.memory()
        rows = []
        for uri, key in zip(uris, keys):
            if uri in finished:
                continue
            if uri in self.own_errors:
                rows.append({**self.own_errors[uri], **base, "uri": uri, "key": key})
                continue
            row = {**base, "uri": uri, "key": key, "stage": "shard", "attempts": attempts, "image_fault": False}
            if memory is not None and uri in memory[1]:
                died = sum(1 for a in self.attempts if a.on_image == uri)
                row["reason"] = (f"out of memory on this image: {memory[0]} while segmenting it, in {died} of {attempts} "
                                 f"attempts; {MEMORY_FIX}")
            elif memory is not None and memory[1]:
                culprit = sorted(memory[1])[0]
                row["reason"] = (f"not segmented: its shard failed {attempts} times because the model actor ran out of memory "
                                 f"on {culprit}; a rerun retries this image")
            else:
                on = f" (the model actor was on {last.on_image})" if last.on_image else ""
                row["reason"] = f"shard failed {attempts} times, last: {last.reason}{on}"
            rows.append(row)
        return rows
