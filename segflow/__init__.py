"""segflow: distributed batch semantic segmentation.

The engine, the flows and the models live in the repository's top-level folders
`pipeline/`, `flows/` and `models/`; pyproject.toml installs them as `segflow.pipeline`,
`segflow.flows` and `segflow.models`, so segflow owns one import name and a user's own
`models/` or `pipeline/` package (in the working directory Ray puts first on its
workers' path) can never shadow it.

The public API is re-exported here and loaded on first use: `import segflow` costs no
Prefect, Ray or torch import.

    from segflow import segment_flow, evaluate_flow, reprocess_flow
    from segflow import read_masks, load_mask, iter_masks
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "segment_flow": "segflow.flows.segment",
    "evaluate_flow": "segflow.flows.evaluate",
    "reprocess_flow": "segflow.flows.reprocess",
    "read_masks": "segflow.pipeline.reader",
    "read_errors": "segflow.pipeline.reader",
    "read_metrics": "segflow.pipeline.reader",
    "load_mask": "segflow.pipeline.reader",
    "iter_masks": "segflow.pipeline.reader",
    "output_metadata": "segflow.pipeline.reader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        if name.endswith("_flow"):
            importlib.import_module("segflow.flows")  # its quiet-offline Prefect defaults come first
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'segflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
