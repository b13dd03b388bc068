"""What a flow run publishes to Prefect: counts and throughput, and for evaluations mIoU.

Artifact keys are derived from the OUTPUT location (`segflow-run-<hash>`,
`segflow-evaluation-<hash>`, `segflow-report-<hash>`), so the UI's Artifacts page keeps
one history per output: last night's numbers beside tonight's.

Nothing here may carry credentials. Storage options never reach this module (they are
not flow parameters, and `RunSummary.output` is already redacted); every location that
is printed goes through `segflow.pipeline.storage.redact`, which drops user:password and query
strings (signed URLs) from URLs.
"""

from __future__ import annotations

import hashlib
import math

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from segflow.flows.locking import canonical_output
from segflow.pipeline.evaluation.metrics import minus
from segflow.pipeline.storage import redact


def artifact_key(kind: str, output: str) -> str:
    """`segflow-<kind>-<hash of OUTPUT>`: lowercase, digits and dashes, as Prefect requires."""
    return f"segflow-{kind}-{hashlib.sha256(canonical_output(output).encode()).hexdigest()[:16]}"


def publish_run(summary: dict, output: str, flow: str, plan: str | None = None) -> None:
    """A two-column table of what the run did and how fast. `summary` is RunSummary.to_dict()."""
    rows = [
        ("images in input", summary["images_total"]),
        ("masks written", summary["masks"]),
        ("error rows", summary["errors"]),
        ("up to date (skipped)", summary["up_to_date"]),
        ("deleted from input", summary["deleted"]),
        ("pruned from output", summary["pruned"]),
        ("shards committed", summary["shards_run"]),
        ("shard retries", summary.get("shard_retries", 0)),
        ("seconds", summary["seconds"]),
        ("images per second", summary["images_per_second"]),
        ("seconds to first commit", summary.get("seconds_to_first_commit")),
        ("model fingerprint", summary["model_fingerprint"]),
        ("CRF fingerprint", summary["crf_fingerprint"]),
        ("output", redact(summary["output"])),
    ]
    description = f"segflow {flow} into {redact(output)}" + (f"\n\nPlan: {plan}" if plan else "")
    create_table_artifact(
        table=[{"measure": name, "value": _cell(value)} for name, value in rows],
        key=artifact_key("run", output),
        description=description,
    )


def publish_plan(plan: str, output: str, flow: str) -> None:
    """For a dry run: what would be processed, as markdown."""
    create_markdown_artifact(
        markdown=f"### segflow {flow} (dry run)\n\n{plan}\n\nOutput: `{redact(output)}`",
        key=artifact_key("plan", output),
        description=f"plan for {redact(output)}",
    )


def publish_evaluation(evaluation: dict, classes: list[str], output: str) -> None:
    """mIoU without and with the CRF, per-class IoU, and a link to report.html.

    `evaluation` is `job.finish_evaluation`'s dict: "raw" and "crf" score blocks (crf is
    None when the CRF was off), each with "miou" and "per_class": {"iou": [...]}.
    """
    raw, crf = evaluation.get("raw") or {}, evaluation.get("crf") or {}
    raw_iou = (raw.get("per_class") or {}).get("iou") or []
    crf_iou = (crf.get("per_class") or {}).get("iou") or []
    rows = [{"class": "mIoU (all classes)", "IoU raw": _cell(raw.get("miou")), "IoU CRF": _cell(crf.get("miou")),
             "CRF gain": _cell(minus(crf.get("miou"), raw.get("miou")))}]
    for i, name in enumerate(classes):
        r = raw_iou[i] if i < len(raw_iou) else None
        c = crf_iou[i] if i < len(crf_iou) else None
        rows.append({"class": name, "IoU raw": _cell(r), "IoU CRF": _cell(c), "CRF gain": _cell(minus(c, r))})
    create_table_artifact(
        table=rows,
        key=artifact_key("evaluation", output),
        description=f"segflow evaluation of {redact(output)}: IoU from the summed confusion matrix, without and with the dense CRF",
    )

    headline = [
        "| | raw | CRF |",
        "|---|---|---|",
        *(f"| {label} | {_cell(raw.get(k))} | {_cell(crf.get(k))} |" for label, k in _HEADLINE),
    ]
    report = evaluation.get("report")
    markdown = "\n".join([
        f"### segflow evaluation: {redact(output)}",
        "",
        f"{evaluation.get('images_scored', 0)} images scored, {evaluation.get('images_with_crf', 0)} with CRF.",
        "",
        *headline,
        "",
        f"Report: `{redact(report)}`" if report else "",
    ])
    create_markdown_artifact(markdown=markdown, key=artifact_key("evaluation-summary", output), description="mIoU raw vs CRF")
    if report:
        create_link_artifact(link=_link(report), link_text="report.html", key=artifact_key("report", output),
                             description=f"evaluation report for {redact(output)}")


_HEADLINE = (("mIoU", "miou"), ("pixel accuracy", "pixel_accuracy"), ("mean class accuracy", "mean_class_accuracy"),
             ("boundary F1", "bf"), ("trimap mIoU", "trimap_miou"))


def _link(location: str) -> str:
    """A URL for the UI: local paths become file:// URLs; credentials are dropped."""
    uri = canonical_output(location)
    return redact(f"file://{uri}" if uri.startswith("/") else uri)


def _cell(value):
    """Round floats for reading; keep None/NaN as an empty cell."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def publish_changes(summary: dict, report: str, output: str, classes_shown: int = 5) -> None:
    """What a reprocess changed (`pipeline.diff` summary of the images it replaced): counts, the most changed
    classes, and a link to the diff report. Every number comes from the summed change matrix."""
    from segflow.pipeline.diff import most_changed_classes

    over = summary["images_changed_over"]
    rows = [{"measure": "images compared with their previous mask", "value": summary["images_compared"]},
            {"measure": "pixels changed (share)", "value": _cell(summary["changed_fraction"])},
            *({"measure": f"images changed > {float(t) * 100:g} %", "value": n} for t, n in over.items())]
    classes = most_changed_classes(summary, classes_shown)
    index = {name: i for i, name in enumerate(summary["classes"])}
    per = summary["per_class"]
    rows += [{"measure": f"class {name}: gained / lost px, IoU old-new",
              "value": f"{per['gained'][index[name]]} / {per['lost'][index[name]]}, {_cell(per['iou'][index[name]])}"}
             for name, _ in classes]
    create_table_artifact(table=rows, key=artifact_key("changes", output),
                          description=f"what this run changed in {redact(output)}, against the masks it replaced")
    markdown = "\n".join([
        f"### segflow: what changed in {redact(output)}",
        "",
        f"{summary['images_compared']} replaced images compared with their previous masks: "
        f"{summary['changed_fraction'] * 100:.2f} % of pixels changed; images changed "
        + ", ".join(f"> {float(t) * 100:g} %: {n}" for t, n in over.items()) + ".",
        "",
        "Most changed classes: " + (", ".join(f"{name} ({count:,} px)" for name, count in classes) or "none") + ".",
        "",
        f"Report: `{redact(report)}`",
    ])
    create_markdown_artifact(markdown=markdown, key=artifact_key("changes-summary", output), description="what changed")
    create_link_artifact(link=_link(report), link_text="diff report.html", key=artifact_key("changes-report", output),
                         description=f"diff report for {redact(output)}")
