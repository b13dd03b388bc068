"""A local Ray head without the daemons a batch job never uses.

`ray.init()` on a fresh machine starts, beside the GCS and the raylet (and the raylet's
dashboard and runtime-env agents, which the raylet needs), three Python daemons, each a
fresh interpreter importing Ray:

- the autoscaler's monitor, which scales a cluster that is one fixed local node here;
- the log monitor, which copies every worker's stdout and stderr to the driver's console
  (segflow reports a worker's failure through the exception it raises; the workers' output
  stays in the session's log files);
- the dashboard's API server (job submission and the state API; `include_dashboard=False`
  already leaves out the dashboard itself).

Together they are ~1.5 of the ~2.9 CPU-seconds of Ray's own daemons at every start of a
local Ray (measured on 2 cores: monitor 0.36, API server 0.71, log monitor 0.39 CPU-s),
which on a 2-core machine is most of a second of every command-line run, for nothing the
job uses. Ray's `ray.init` has no switch for them (`ray start` has `--no-monitor` and
`--include-log-monitor`, but a cluster started that way outlives the driver), so for the
duration of segflow's own local start the three `Node.start_*` methods are no-ops. Where
a Ray version lacks one of them, that daemon simply starts: the start is never worse
than plain `ray.init`. Clusters given by address are joined as they are.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

UNUSED_DAEMONS = ("start_monitor", "start_log_monitor", "start_api_server")

_lock = threading.Lock()


@contextlib.contextmanager
def without_unused_daemons() -> Iterator[None]:
    """Within the block, a local `ray.init` starts none of UNUSED_DAEMONS (those this Ray has)."""
    from ray._private import node as ray_node

    with _lock:
        saved = {name: ray_node.Node.__dict__[name] for name in UNUSED_DAEMONS if name in ray_node.Node.__dict__}
        try:
            for name in saved:
                setattr(ray_node.Node, name, _not_started)
            yield
        finally:
            for name, method in saved.items():
                setattr(ray_node.Node, name, method)


def _not_started(self, *args, **kwargs) -> None:
    return None
