"""Flags shared by the commands that run the engine, and their translation into SegmentConfig.

Every flag is a leaf of the job's configuration tree (`segflow.flows.parameters.JobSpec`),
generated from it with its description and default; `config_from_args` is the only place
flags become a job, through that tree, so the CLI, config files and flows agree.
"""

from __future__ import annotations

import difflib
import json
import sys
import tomllib
from pathlib import Path

from segflow.errors import UsageError
from segflow.flows.parameters import Execution, Incremental
from segflow.pipeline.config import LabelPairing, ModelRef, SegmentConfig


def add_engine_args(p, several_refiners: bool = False) -> None:
    """Model, CRF, engine, incremental-run and storage flags (segment, evaluate, reprocess, schedule).

    Generated from the leaves of the job's configuration tree (segflow.flows.parameters.JobSpec):
    each flag's help is its field's description and its default the field's default.
    """
    p.add_argument("--config", help="TOML or JSON file of option defaults: flag names with underscores, or the job tree's "
                                    "tables ([model], [execution], [incremental], ...) (default: none)")
    add_model_fields(p.add_argument_group("model"), ModelRef, parsers=MODEL_PARSERS)
    add_refinement_args(p, several=several_refiners)
    e = p.add_argument_group("engine")
    add_model_fields(e, Execution, skip=("channels_last", "progress"))
    e.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    add_model_fields(p.add_argument_group("incremental runs"), Incremental)
    s = p.add_argument_group("storage")
    s.add_argument("--storage-options", help="JSON of fsspec options (e.g. endpoint, profile); prefer env vars for secrets; "
                                             "never stored as a flow parameter (default: none)")


PARAMETER_HELP = {
    "iterations": "mean-field iterations",
    "gaussian_sxy": "smoothness kernel width, px",
    "gaussian_compat": "smoothness kernel weight",
    "bilateral_sxy": "appearance kernel spatial width, px",
    "bilateral_srgb": "appearance kernel colour width, intensity levels 0..255",
    "bilateral_compat": "appearance kernel weight",
    "backend": "mean-field message passing: lattice (fully connected, pydensecrf2's model) or window (ConvCRF's local window)",
    "window_size": "window backend: neighbours within this odd window, px at the downsampled resolution",
    "downsample": "window backend: messages computed at 1/N resolution",
}


def add_refinement_args(p, several: bool = False) -> None:
    """--crf KIND (with `several`, KIND[,KIND...]) and one --crf-<param> flag per parameter of any registered kind.

    The flags are generated from the kinds' parameter dataclasses (segflow.models.crf), so a
    new kind's parameters appear here without editing this file. A flag given overrides
    only its own parameter: the others keep the checkpoint's tuned values, else the kind's.
    """
    from dataclasses import fields

    from segflow.models.crf import DEFAULT_REFINEMENT, REFINEMENTS

    c = p.add_argument_group("refinement (CRF)")
    kinds = "; ".join(f"{k}: {v.summary}" for k, v in REFINEMENTS.items())
    if several:
        c.add_argument("--crf", dest="refinement", type=refinement_list, default=DEFAULT_REFINEMENT, metavar="KIND[,KIND...]",
                       help=f"refinement kind, or several separated by commas, each evaluated into OUTPUT/<kind>/ against the same "
                            f"raw masks and compared in OUTPUT/comparison.html (default {DEFAULT_REFINEMENT}): {kinds}")
    else:
        c.add_argument("--crf", dest="refinement", choices=tuple(REFINEMENTS), default=DEFAULT_REFINEMENT,
                       help=f"refinement kind (default {DEFAULT_REFINEMENT}): {kinds}")
    c.add_argument("--no-crf", dest="refinement", action="store_const", const="none", default=DEFAULT_REFINEMENT, help=f"the same as --crf none: masks are the model's argmax (default off, i.e. --crf {DEFAULT_REFINEMENT})")
    seen: dict[str, list[str]] = {}
    declared: dict[str, object] = {}
    for name, kind in REFINEMENTS.items():
        for f in fields(kind.params_type) if kind.params_type is not None else ():
            seen.setdefault(f.name, []).append(f"{name}: {f.default}")
            declared.setdefault(f.name, f)
    for pname, defaults in seen.items():
        f = declared[pname]
        kind_type = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}.get(str(f.type), str)
        what = PARAMETER_HELP.get(pname, pname.replace("_", " "))
        c.add_argument(f"--crf-{pname.replace('_', '-')}", dest=f"crf_{pname}", type=kind_type,
                       help=f"{what} (default: the checkpoint's tuned value, else {', '.join(defaults)})")


def refinement_list(text: str) -> str:
    """--crf dense,meanfield: registered kinds, each once (argparse's one-line error otherwise)."""
    import argparse

    from segflow.models.crf import REFINEMENTS

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in REFINEMENTS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: give kinds of {', '.join(REFINEMENTS)}, each once, separated by commas")
    return ",".join(kinds)


def refinement_overrides(args) -> dict:
    """The --crf-<param> flags the user gave, by parameter name."""
    prefix = "crf_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and k != "crf_workers" and v is not None}


def add_model_fields(group, model, skip: tuple[str, ...] = (), parsers: dict | None = None) -> None:
    """One flag per leaf of a branch of the job tree (a pydantic model or a dataclass), with its description and its one default.

    The flows take the same branches as parameters (Prefect's UI form), so the command line
    and the flow schema cannot drift: tests/test_config.py compares them. `parsers` gives
    a (type, metavar) for a leaf whose value needs its own syntax on the command line.
    """
    import typing

    parsers = parsers or {}
    for name, annotation, default, description in branch_leaves(model):
        if name in skip:
            continue
        flag = f"--{name.replace('_', '-')}"
        shown = "none" if default is None else default
        help_text = f"{description} (default {shown})"
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if name in parsers:
            kind, metavar = parsers[name]
            group.add_argument(flag, type=kind, default=default, metavar=metavar, help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(annotation), default=default, help=help_text)
        elif annotation is bool:
            if default:
                raise TypeError(f"{model.__name__}.{name}: a flag for a bool that defaults to True needs a --no- form")
            group.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = args[0] if args else annotation
            group.add_argument(flag, type=kind, default=default, help=help_text)


def branch_leaves(branch) -> list[tuple[str, object, object, str]]:
    """(name, annotation, default, description) of each field of a pydantic model or an annotated dataclass."""
    import dataclasses
    import typing

    if hasattr(branch, "model_fields"):
        return [(name, info.annotation, info.get_default(call_default_factory=True), info.description or "")
                for name, info in branch.model_fields.items()]
    hints = typing.get_type_hints(branch, include_extras=True)
    leaves = []
    for f in dataclasses.fields(branch):
        hint = hints[f.name]
        description = next((getattr(m, "description", None) for m in getattr(hint, "__metadata__", ()) if getattr(m, "description", None)), "")
        annotation = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        leaves.append((f.name, annotation, f.default, description))
    return leaves


def apply_config_file(parser, path: str) -> None:
    """Make a TOML/JSON file's values the parser's defaults; flags on the command line still win."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from None
    try:
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a table of option names and values")
    values = flatten_job_tree({k.replace("-", "_"): v for k, v in values.items()}, path)
    if values.pop("no_crf", False):
        values["refinement"] = "none"
    if "crf" in values:  # the flag's name; its destination is `refinement`
        values["refinement"] = values.pop("crf")
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config")} | CONFIG_ONLY_KEYS
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"--config {path}: unknown option {key!r}{hint}")
    parser.set_defaults(**values)


CONFIG_ONLY_KEYS = {"images", "labels", "output", "input"}  # positional arguments a config file may give by name

# Tables of the job tree a config file may use, and how their keys map to flag destinations.
TREE_TABLES = ("model", "refinement", "execution", "incremental", "storage", "evaluation")
RENAMED_LEAVES = {("storage", "options"): "storage_options", ("refinement", "kind"): "refinement", ("pairing", "format"): "label_format"}


def flatten_job_tree(values: dict, path: str) -> dict:
    """A config file written as the job tree ([model], [execution], ...) as flag destinations.

    `model` is also a flag (the registry name), so only a table is read as the branch.
    Refinement parameters become their `crf_` flags; an evaluation's pairing table its flags.
    """
    flat = {}
    for key, value in values.items():
        if key not in TREE_TABLES or not isinstance(value, dict):
            flat[key] = value
            continue
        for leaf, leaf_value in value.items():
            leaf = leaf.replace("-", "_")
            if key == "refinement" and leaf == "params":
                if not isinstance(leaf_value, dict):
                    raise UsageError(f"--config {path}: refinement.params must be a table of parameter names and values")
                flat.update({f"crf_{name.replace('-', '_')}": v for name, v in leaf_value.items()})
            elif key == "evaluation" and leaf == "pairing" and isinstance(leaf_value, dict):
                flat.update({RENAMED_LEAVES.get(("pairing", k), k): v for k, v in leaf_value.items()})
            else:
                flat[RENAMED_LEAVES.get((key, leaf), leaf)] = leaf_value
    return flat


def config_from_args(args, input: str, output: str, evaluation: LabelPairing | None = None) -> SegmentConfig:
    """Build the job's SegmentConfig from parsed flags, through the job tree, which validates it."""
    from pydantic import ValidationError

    from segflow.flows.parameters import Evaluation, Incremental, JobSpec, Pairing, Refinement

    def branch(model) -> dict:
        return {name: getattr(args, name) for name, *_ in branch_leaves(model) if hasattr(args, name)}

    overrides = refinement_overrides(args) if args.refinement != "none" else {}
    try:
        spec = JobSpec(
            input=input,
            output=output,
            model=ModelRef(**branch(ModelRef)),
            refinement=Refinement(kind=args.refinement, params=overrides),
            execution=Execution(**branch(Execution)),
            incremental=Incremental(**branch(Incremental)),
            evaluation=None if evaluation is None else Evaluation(
                labels=evaluation.labels, pairing=Pairing(**{k: v for k, v in vars(evaluation).items() if k != "labels"})),
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = "--" + str(error["loc"][-1]).replace("_", "-") if error["loc"] else "the configuration"
        raise UsageError(f"{where}: {error['msg']}, got {error.get('input')!r}") from None
    return spec.to_config().with_(
        progress=not args.no_progress and sys.stderr.isatty(),
        storage_options=json_object("--storage-options", args.storage_options),
    )


def working_size_arg(text: str) -> int | str:
    """--working-size: "full" or a long side in pixels (ModelRef checks the range)."""
    return text if text == "full" else int(text)


def tiles_arg(text: str) -> tuple[int, int]:
    """--tiles SIZE,STRIDE -> (size, stride) (ModelRef checks the values)."""
    size, _, stride = text.partition(",")
    return int(size), int(stride or size)


# Leaves of ModelRef with a command-line syntax of their own: (type, metavar).
MODEL_PARSERS = {"working_size": (working_size_arg, "PX|full"), "tiles": (tiles_arg, "SIZE,STRIDE")}


def json_object(flag: str, text: str | dict | None) -> dict:
    """Parse a flag's JSON-object value ({} when absent); a bad one is a one-line UsageError.

    A --config file may give the value as a table (TOML) or object (JSON) instead of a string.
    """
    if not text:
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} must be a JSON object ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{{\"key\": 1}}'")
    return value
