"""`segflow models`: everything `--model`, `--crf` and `segflow train --head` can name.

It reads the three registries (models in segflow.models.catalog, heads in
segflow.models.heads, refinement kinds in segflow.models.crf) and the bundled
checkpoint's metadata, so what it prints cannot drift from what the engine accepts.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the models, heads and refinement kinds segflow can run")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table (default: a table)")
    p.set_defaults(run=run)


def registry_entries() -> dict:
    """{"models": [...], "heads": [...], "refinements": [...]}, each entry a dict with `name` and `summary`."""
    from segflow.models import catalog
    from segflow.models.checkpoint import read_checkpoint_meta
    from segflow.models.crf import DEFAULT_REFINEMENT, REFINEMENTS
    from segflow.models.heads import DEFAULT_HEAD, HEADS, head_class

    meta, _ = read_checkpoint_meta(str(catalog.BUNDLED_CHECKPOINT))
    metrics = meta.get("metrics", {})
    arch = meta["architecture"]
    bundled = {
        "name": catalog.BUNDLED,
        "default": True,
        "summary": f"{meta['labels'].get('name', '').capitalize()} FCN-{arch['variant'][3:]} on {arch['backbone']}, trained by segflow "
        f"(models/bundled/MODEL_CARD.md)",
        "val_miou": metrics.get("val_miou"),
        "val_miou_crf": metrics.get("val_miou_crf"),
    }
    models = [bundled]
    for name in catalog.FCN_MODELS:
        models.append({"name": name, "summary": "segflow's FCN, untrained: `segflow train`, or --weights none for seeded random weights"})
    for name in catalog.HEAD_MODELS:
        head = name.rsplit("_", 1)[1]
        path = catalog.head_checkpoint_path(name)
        entry = {"name": name, "summary": f"the bundled FCN-8s with the {head} head" + ("" if path.exists() else " (no checkpoint yet: `segflow train --head " + head + "`)")}
        if path.exists():
            try:
                entry["val_miou"] = read_checkpoint_meta(str(path))[0].get("metrics", {}).get("val_miou")
            except Exception as exc:  # listed with its trouble, not a traceback: loading it says the same in full
                entry["summary"] += f" (its checkpoint does not read: {str(exc).splitlines()[0][:120]})"
        models.append(entry)
    for name in catalog.TORCHVISION_MODELS:
        models.append({"name": name, "summary": "torchvision's model (VOC classes); --weights DEFAULT downloads its weights"})
    heads = []
    for name in HEADS:
        cls = head_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        heads.append({"name": name, "default": name == DEFAULT_HEAD, "summary": doc, "training": getattr(cls, "training_mode", None)})
    refinements = [
        {"name": name, "default": name == DEFAULT_REFINEMENT, "summary": kind.summary, "runs_on": kind.runs_on}
        for name, kind in REFINEMENTS.items()
    ]
    return {"models": models, "heads": heads, "refinements": refinements}


def run(args) -> int:
    entries = registry_entries()
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    lines = ["models (--model NAME):"]
    for m in entries["models"]:
        score = ""
        if m.get("val_miou") is not None:
            score = f" CamVid val mIoU {100 * m['val_miou']:.1f}"
            if m.get("val_miou_crf") is not None:
                score += f", {100 * m['val_miou_crf']:.1f} with its dense CRF"
        lines.append(f"  {m['name']:<30} {'(default) ' if m.get('default') else ''}{m['summary']}{';' if score else ''}{score}")
    lines.append("heads (segflow train --head NAME):")
    lines += [f"  {h['name']:<30} {'(default) ' if h['default'] else ''}{h['summary']} [{h['training']}]" for h in entries["heads"]]
    lines.append("refinement kinds (--crf KIND):")
    lines += [f"  {r['name']:<30} {'(default) ' if r['default'] else ''}{r['summary']} [{r['runs_on']}]" for r in entries["refinements"]]
    print("\n".join(lines))
    return 0
