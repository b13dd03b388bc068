"""The heads registry: what sits on top of a network's backbone and FCN decoder.

A segflow network is backbone -> decoder (the FCN-32s/16s/8s skip fusion, models/fcn.py)
-> head. The head declares its loss, the inputs it needs (features, logits, the RGB
image) and how it trains (`joint`, `staged` on a frozen base, or `piecewise`); the
contract is `segflow.models.heads.base.Head`.

A new head is one file in this folder plus one line below. The entries name a module and
a class instead of importing them, so the driver (which lists model names through
`segflow.models.catalog` and must not import torch) can read this table for free; the
class is imported on first use by `head_class`.
"""

from __future__ import annotations

import importlib

HEADS: dict[str, str] = {
    "fcn": "segflow.models.heads.fcn:FCNHead",
    "dpn": "segflow.models.heads.dpn:DPNHead",
    "context": "segflow.models.heads.context:ContextCRFHead",
    "crfrnn": "segflow.models.heads.crfrnn:CRFRNNHead",
}

DEFAULT_HEAD = "fcn"


def head_class(name: str):
    """The Head subclass registered as `name` (imports its module, and torch, on first use)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    module, _, cls = HEADS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
