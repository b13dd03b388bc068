"""`segflow evaluate IMAGES LABELS OUTPUT`: segment a labelled collection and score it, raw vs CRF (or vs several refiners)."""

from __future__ import annotations

from segflow.errors import UsageError
from segflow.flows.commands.options import add_engine_args, config_from_args, json_object
from segflow.flows.parameters import Pairing
from segflow.pipeline.config import LabelPairing


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="segment IMAGES, compare with LABELS, write per-image metrics, summary and report.html",
        description="Images and labels pair by file stem (after removing --image-suffix/--label-suffix). "
        "IMAGES/LABELS/OUTPUT may also come from --config (keys images, labels, output).",
    )
    p.add_argument("images", metavar="IMAGES", nargs="?")
    p.add_argument("labels_location", metavar="LABELS", nargs="?")
    p.add_argument("output", metavar="OUTPUT", nargs="?")
    g = p.add_argument_group("ground truth")
    d = Pairing.model_fields  # the defaults, written once there (the evaluate flow's `pairing` parameter)
    g.add_argument("--image-suffix", default=d["image_suffix"].default, help="stem suffix of images to strip before pairing, e.g. Cityscapes' _leftImg8bit (default: none)")
    g.add_argument("--label-suffix", default=d["label_suffix"].default, help="stem suffix of labels, e.g. Cityscapes' _gtFine_labelIds (default: none)")
    g.add_argument("--label-format", choices=("index", "palette", "rgb"), default=d["format"].default, help=f"class-index PNG, palette PNG (VOC) or colour-coded RGB (default {d['format'].default})")
    g.add_argument("--colors", help='JSON colour table for --label-format rgb: {"128,64,128": 3, ...} (default: none)')
    g.add_argument("--remap", help='JSON map of label values to classes, e.g. Cityscapes labelIds->trainIds {"7": 0, "8": 1}; unmapped -> ignore (default: none)')
    g.add_argument("--ignore-index", type=int, help="void label value (default: the label set's, CamVid 11, else 255)")
    g.add_argument("--boundary-tolerance", type=int, default=d["boundary_tolerance"].default, help=f"boundary F-score tolerance in pixels (default {d['boundary_tolerance'].default})")
    g.add_argument("--trimap-width", type=int, default=d["trimap_width"].default, help=f"band around label boundaries for trimap mIoU, pixels (default {d['trimap_width'].default})")
    add_engine_args(p, several_refiners=True)
    p.set_defaults(run=run, labels=None)


def pairing_from_args(args) -> LabelPairing:
    return LabelPairing(
        labels=args.labels_location,
        image_suffix=args.image_suffix,
        label_suffix=args.label_suffix,
        format=args.label_format,
        colors=_colour_table(args.colors),
        remap=tuple((int(k), int(v)) for k, v in json_object("--remap", args.remap).items()),
        ignore_index=args.ignore_index,
        boundary_tolerance=args.boundary_tolerance,
        trimap_width=args.trimap_width,
    )


def run(args) -> int:
    from segflow.flows.runner import run_evaluate_job

    if args.labels and not args.labels_location:
        args.labels_location = args.labels  # from a config file's "labels" key
    missing = [n for n, v in (("IMAGES", args.images), ("LABELS", args.labels_location), ("OUTPUT", args.output)) if not v]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}: give IMAGES LABELS OUTPUT, or a --config with images, labels, output")
    kinds = args.refinement.split(",")
    if len(kinds) == 1:
        run_evaluate_job(config_from_args(args, args.images, args.output, evaluation=pairing_from_args(args)))
        return 0
    return run_several_refiners(args, kinds)


def run_several_refiners(args, kinds: list[str]) -> int:
    """`--crf dense,meanfield`: one evaluation per kind into OUTPUT/<kind>/, then OUTPUT/comparison.{json,html}.

    Each kind is a complete evaluation (and so incremental on a rerun); every --crf-<param>
    goes to the kinds that have it, and one that no listed kind has is an error, as for one kind.
    """
    import argparse

    from segflow.flows.commands.options import refinement_overrides
    from segflow.flows.runner import print_comparison, run_evaluate_job
    from segflow.models.crf import parameter_names, refinement_kind
    from segflow.pipeline.evaluation.comparison import compare_refiners

    overrides = refinement_overrides(args)
    declared = {k: set(parameter_names(refinement_kind(k))) for k in kinds}
    orphans = [name for name in overrides if not any(name in names for names in declared.values())]
    if orphans:
        raise UsageError(f"--crf-{orphans[0].replace('_', '-')}: none of {', '.join(kinds)} has this parameter")
    base = args.output.rstrip("/")
    evaluations = {}
    for kind in kinds:
        sub = argparse.Namespace(**vars(args))
        sub.refinement = kind
        for name in overrides:
            if name not in declared[kind]:
                setattr(sub, f"crf_{name}", None)
        print(f"segflow: evaluating --crf {kind} into {base}/{kind}")
        cfg = config_from_args(sub, args.images, f"{base}/{kind}", evaluation=pairing_from_args(args))
        _, evaluations[kind] = run_evaluate_job(cfg)
    print_comparison(compare_refiners(base, evaluations, cfg.storage_options), base)
    return 0


def _colour_table(text: str | None) -> tuple:
    table = []
    for colour, cls in json_object("--colors", text).items():
        try:
            rgb = tuple(int(v) for v in colour.split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3:
            raise UsageError(f"--colors: key {colour!r} is not 'r,g,b'")
        table.append((rgb, int(cls)))
    return tuple(table)
