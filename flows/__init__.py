"""segflow's Prefect flows and its command line.

`from segflow import segment_flow, evaluate_flow, reprocess_flow` gives the three flows.
They are loaded on first use, not at import: `segflow.flows.cli` lives in this package and
`segflow train` should not pay for importing Prefect.

Prefect reads its settings from the environment when it is imported, and the ephemeral
API server it starts (when no PREFECT_API_URL is set) reads them from the environment it
inherits. So the defaults that keep an offline machine quiet are set here, before any
module of this package imports Prefect:

- the ephemeral server would otherwise try to post anonymous usage telemetry and log
  "Failed to send telemetry" on every start without network
  (PREFECT_SERVER_ANALYTICS_ENABLED; DO_NOT_TRACK for the client side);
- on a busy shared machine the ephemeral server can take longer than Prefect's 20 s
  default to start, which fails the run before any work is done.

They are `setdefault`s: anything the user exported wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

_FLOWS = {
    "segment_flow": "segflow.flows.segment",
    "evaluate_flow": "segflow.flows.evaluate",
    "reprocess_flow": "segflow.flows.reprocess",
}

__all__ = list(_FLOWS)


def __getattr__(name: str):
    if name in _FLOWS:
        import importlib

        return getattr(importlib.import_module(_FLOWS[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
