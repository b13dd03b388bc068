"""Refinement kinds: graphical models that turn a network's probabilities into labels.

Each kind is one module plus one line in `REFINEMENTS`. A kind is a class with:

- `name`, `version`, `summary` (one line for `segflow models`);
- `params_type`: a frozen dataclass of its typed parameters (defaults written once, there);
- `runs_on`: "cpu" (a CRF worker, per image, on numpy arrays) or "device" (inside the model
  actor, on the batch still on the GPU);
- `fingerprint()`: what every row it refines records; `kind@version` plus its parameters;
- `refine(rgb, probs) -> labels` (per image, numpy), and for device kinds also
  `refine_batch(logits, pixels) -> labels` on the network's batch still on its device.

The engine looks kinds up here and nowhere else; it never names a CRF library.
`resolve_refinement` chooses the parameters: the ones given explicitly override only
themselves, the rest come from the checkpoint's tuned values for that kind (a checkpoint's
`crf` metadata holds the dense CRF's), and then from the kind's defaults.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, fields

from segflow.errors import ConfigError
from segflow.models.crf.dense import DenseCRF
from segflow.models.crf.meanfield_kind import MeanFieldRefinement


class NoRefinement:
    """The `none` kind: the mask is the network's own argmax."""

    name = "none"
    version = 1
    runs_on = "cpu"
    params_type = None
    summary = "no refinement: the mask is the network's argmax"

    def __init__(self, params=None):
        self.params = None

    def fingerprint(self) -> str:
        return "none"  # what rows without a CRF have always recorded


REFINEMENTS: dict[str, type] = {
    "none": NoRefinement,
    "dense": DenseCRF,
    "meanfield": MeanFieldRefinement,
}

DEFAULT_REFINEMENT = "dense"


def refinement_kind(name: str) -> type:
    """The registered kind called `name`; a one-line error naming the choices otherwise."""
    try:
        return REFINEMENTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, REFINEMENTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"--crf {name!r} is not a refinement kind{hint}; choose one of {', '.join(REFINEMENTS)}") from None


def parameter_names(kind: type) -> list[str]:
    return [f.name for f in fields(kind.params_type)] if kind.params_type is not None else []


def resolve_refinement(name: str, overrides: dict | None = None, tuned: dict | None = None):
    """The configured refinement: kind `name` with `overrides` > `tuned` > the kind's defaults.

    `tuned` is the checkpoint's tuned parameters for this kind (or None). An override the
    kind does not have is a one-line error naming the nearest parameter it does have.
    """
    kind = refinement_kind(name)
    overrides = dict(overrides or {})
    known = parameter_names(kind)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; it takes {', '.join(known)}" if known else "; it takes none")
            raise ConfigError(f"refinement {name!r} has no parameter {key!r}{hint}")
    if kind.params_type is None:
        return kind()
    base = asdict(kind.params_type())
    base.update({k: v for k, v in (tuned or {}).items() if k in known})
    base.update(overrides)
    return kind(kind.params_type(**base))
