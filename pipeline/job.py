"""A segflow job as four stages: list, plan, run, summarise.

The CLI and the Prefect flows call these same functions (the flows make each a Prefect
task). `run_segment` chains them for library users.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from segflow.pipeline.config import SegmentConfig, digest
from segflow.errors import ConfigError, InputError
from segflow.pipeline.listing import list_inputs
from segflow.pipeline.sharding import Shard, plan_resumable
from segflow.pipeline.history import Replacer, finish_pending, pending_records
from segflow.pipeline.state import diff_work, read_existing
from segflow.pipeline.storage import redact

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run will do, computed without side effects."""

    shards: list[Shard]
    images_total: int
    up_to_date: int
    deleted: list[str]
    drop_uris: set[str]
    unpaired_labels: list[str]
    model_fingerprint: str
    refinement: object  # a resolved kind of segflow.models.crf (parameters chosen)
    job_fingerprint: str
    labels: dict
    seconds: float = 0.0
    interrupted_replacements: int = 0  # records a killed run left in OUTPUT/_replacing: the run stage finishes them
    precision: str = "off"  # the network's autocast: off (full precision), bf16 or fp16; in the fingerprint unless off
    rescore: list = field(default_factory=list)  # evaluation/rescore.Rescore: current masks whose labels changed

    @property
    def to_process(self) -> int:
        return sum(len(s) for s in self.shards)

    def describe(self) -> str:
        # deletions are reported even when there is nothing to do: only the user can decide to prune
        deleted = ""
        if self.deleted:
            pruning = self.drop_uris & set(self.deleted)
            deleted = f"{len(self.deleted)} deleted from the source" + (" (pruning)" if pruning else " (kept; --prune removes them)")
        finishing = f"; finishing {self.interrupted_replacements} interrupted replacement(s)" if self.interrupted_replacements else ""
        rescoring = sum(len(r.uris) for r in self.rescore)
        finishing += f"; {rescoring} to rescore from their stored masks (labels changed)" if rescoring else ""
        if not self.shards and not self.drop_uris and not rescoring:
            return f"nothing to do: all {self.images_total} images are up to date" + (f"; {deleted}" if deleted else "") + finishing
        parts = [f"{self.to_process} of {self.images_total} images to process in {len(self.shards)} shards"]
        if self.up_to_date:
            parts.append(f"{self.up_to_date} up to date")
        if deleted:
            parts.append(deleted)
        return ", ".join(parts) + finishing


@dataclass
class RunSummary:
    """The outcome of a job, for the CLI's last lines, flow artifacts and callers."""

    output: str
    images_total: int
    masks: int
    errors: int
    up_to_date: int
    deleted: int
    pruned: int
    shards_run: int
    shard_retries: int
    seconds: float
    images_per_second: float
    seconds_to_first_commit: float | None
    model_fingerprint: str
    crf_fingerprint: str
    stage_seconds: dict = field(default_factory=dict)
    errors_to_retry: int = 0  # error rows not blaming their image: the next run tries those images again

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        retry = f" ({self.errors_to_retry} not the images' fault: a rerun retries them)" if self.errors_to_retry else ""
        return (
            f"{self.masks} masks, {self.errors} errors{retry}, {self.up_to_date} up to date"
            f" ({self.images_total} images) in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s"
            f" -> {self.output}"
        )


def list_stage(cfg: SegmentConfig) -> pa.Table:
    """The manifest of inputs (uri, key, ...; plus label_uri and label_key when evaluating)."""
    manifest = list_inputs(cfg.input, cfg.storage_options, content_hash=cfg.content_hash)
    if cfg.evaluation is None:
        return manifest
    from segflow.pipeline.evaluation.groundtruth import pair_images_with_labels

    labels = list_inputs(cfg.evaluation.labels, cfg.storage_options)
    pairs, unpaired_images, unpaired_labels = pair_images_with_labels(
        manifest.column("uri").to_pylist(), labels.column("uri").to_pylist(), cfg.evaluation
    )
    label_of = dict(pairs)
    # unpaired images stay in the work (label_uri null) and become "label" error rows
    label_uris = pa.array([label_of.get(u) for u in manifest.column("uri").to_pylist()], pa.string())
    manifest = manifest.append_column("label_uri", label_uris)
    # the label's content key: metrics rows carry it, so relabelled ground truth is rescored (evaluation/rescore.py)
    key_of = dict(zip(labels.column("uri").to_pylist(), labels.column("key").to_pylist()))
    manifest = manifest.append_column("label_key", pa.array([key_of.get(u) for u in label_uris.to_pylist()], pa.string()))
    return manifest.replace_schema_metadata({b"unpaired_labels": "\n".join(unpaired_labels).encode()})


def plan_stage(cfg: SegmentConfig, manifest: pa.Table) -> Plan:
    """Compare the manifest with OUTPUT and cut the work into shards."""
    from segflow.models.catalog import describe_model

    t0 = time.perf_counter()
    m = cfg.model
    info = describe_model(m.model, m.checkpoint, m.weights, m.num_classes, m.seed, storage_options=cfg.storage_options)
    model_fingerprint = _model_fingerprint(info, m)
    refinement = _resolve_refinement(cfg, info.meta)
    crf_fingerprint = refinement.fingerprint()
    evaluation = asdict(cfg.evaluation) if cfg.evaluation is not None else None
    if evaluation is not None:
        evaluation.pop("labels")  # where labels live is not what they mean
    precision = planned_precision(cfg)
    what = {"model": model_fingerprint, "crf": crf_fingerprint, "evaluation": evaluation}
    if precision != "off":  # full precision, the CPU default, stays out: outputs made before this key stay current
        what["precision"] = precision
    job_fingerprint = digest(what)
    existing = read_existing(cfg.output, cfg.storage_options)
    work = diff_work(manifest, existing, job_fingerprint, cfg.force, cfg.retry_errors, cfg.prune)
    unpaired = (manifest.schema.metadata or {}).get(b"unpaired_labels", b"").decode()
    rescore = []
    if cfg.evaluation is not None:
        from segflow.pipeline.evaluation.rescore import stale_scores

        rescore = stale_scores(manifest, existing, set(work.work.column("uri").to_pylist()))
    return Plan(
        rescore=rescore,
        shards=plan_resumable(manifest, work.work, cfg.shard_size, job_fingerprint),
        images_total=len(manifest),
        up_to_date=work.up_to_date,
        deleted=work.deleted,
        drop_uris=work.drop_uris,
        unpaired_labels=[u for u in unpaired.split("\n") if u],
        model_fingerprint=model_fingerprint,
        refinement=refinement,
        job_fingerprint=job_fingerprint,
        labels=info.labels.to_dict(),
        seconds=time.perf_counter() - t0,
        interrupted_replacements=len(pending_records(cfg.output, cfg.storage_options)),
        precision=precision,
    )


def _model_fingerprint(info, m) -> str:
    """The checkpoint's fingerprint, plus what changes its masks when not at its default.

    Defaults are left out (huggingface datasets' rule), so a job that does not ask for
    tta, a working size or tiles keeps the fingerprint it always had.
    """
    from segflow.models.working_size import fingerprint_entries

    extras = ({"tta": m.tta} if m.tta != "none" else {}) | fingerprint_entries(m.working_size, info.meta, m.tiles)
    return digest({"model": info.fingerprint, **extras}) if extras else info.fingerprint


def run_stage(cfg: SegmentConfig, plan: Plan):
    """Finish what a killed run left, then run the planned shards on Ray, replacing rows as shards commit.

    No row is removed before its replacement exists: superseded rows stay current until
    the shard that replaces them commits, then move to OUTPUT/history/ (`history.Replacer`).
    A plan with nothing to do returns at once: no Ray, no reading of OUTPUT.
    """
    from segflow.pipeline.engine import ExecutionStats

    if not plan.shards and not plan.drop_uris and not plan.interrupted_replacements and not plan.rescore:
        return ExecutionStats()
    finish_pending(cfg.output, cfg.storage_options)
    existing = read_existing(cfg.output, cfg.storage_options, remove_leftovers=True)
    replacer = Replacer(cfg.output, existing, plan.job_fingerprint, cfg.storage_options, only=plan.drop_uris)
    if cfg.prune:
        replacer.prune(plan.drop_uris & set(plan.deleted))
    stats = _execute(cfg, plan, replacer) if plan.shards else ExecutionStats()
    if plan.rescore:  # relabelled ground truth: metrics from the stored masks, no model
        from segflow.pipeline.evaluation.rescore import rescore

        rescore(cfg.output, plan.rescore, _scoring_context(cfg, plan), plan.job_fingerprint, cfg.storage_options)
    stats.pruned = len(plan.deleted) if cfg.prune else 0
    return stats


def summarise_stage(cfg: SegmentConfig, plan: Plan, stats) -> RunSummary:
    processed = stats.masks + stats.errors
    return RunSummary(
        output=redact(cfg.output),
        images_total=plan.images_total,
        masks=stats.masks,
        errors=stats.errors,
        up_to_date=plan.up_to_date,
        deleted=len(plan.deleted),
        pruned=stats.pruned,
        shards_run=stats.shards_committed,
        shard_retries=stats.shard_retries,
        seconds=round(stats.seconds + plan.seconds, 3),
        images_per_second=round(processed / stats.seconds, 3) if stats.seconds else 0.0,
        seconds_to_first_commit=stats.seconds_to_first_commit,
        model_fingerprint=plan.model_fingerprint,
        crf_fingerprint=plan.refinement.fingerprint(),
        stage_seconds={k: round(v / max(1, stats.masks), 4) for k, v in stats.stage_seconds.items()},
        errors_to_retry=stats.errors_to_retry,
    )


def run_segment(cfg: SegmentConfig, on_plan=None, wait_for_output_seconds: float | None = None) -> RunSummary:
    """List, plan, run and summarise in one call, holding OUTPUT's lock (`lock.output_lock`) throughout.

    A second writer of the same OUTPUT waits for it, up to `wait_for_output_seconds`
    (None: as long as it takes), then raises OutputBusyError.
    """
    from segflow.pipeline.lock import output_lock

    with output_lock(cfg.output, cfg.storage_options, wait_for_output_seconds):
        manifest = list_stage(cfg)
        plan = plan_stage(cfg, manifest)
        if on_plan:
            on_plan(plan)
        return summarise_stage(cfg, plan, run_stage(cfg, plan))


def finish_evaluation(cfg: SegmentConfig, plan: Plan) -> dict:
    """Aggregate OUTPUT/metrics into summary.json/.parquet and write report.html; -> the summary."""
    import json

    from segflow.models.labels import LabelSet
    from segflow.pipeline.evaluation.report import write_report
    from segflow.pipeline.storage import commit_file
    from segflow.pipeline.evaluation.summary import SUMMARY_JSON, summarise_metrics

    from segflow.pipeline.reader import open_dataset, read_errors

    if open_dataset(cfg.output, "metrics", cfg.storage_options) is None:
        errors = read_errors(cfg.output, columns=["reason"], storage_options=cfg.storage_options).column("reason").to_pylist()
        first = f"; the first reason: {errors[0]}" if errors else ""
        raise InputError(f"{redact(cfg.output)}: no image could be scored ({len(errors)} error rows in errors/){first}")
    labels = LabelSet.from_dict(plan.labels)
    pairing = _pairing(cfg, labels)
    summary = summarise_metrics(cfg.output, cfg.storage_options, labels)
    summary["unpaired_labels"] = plan.unpaired_labels
    summary.update(_label_outcomes(cfg))
    summary["provenance"] = _provenance(cfg, plan)
    summary["report"] = redact(write_report(cfg.output, summary, labels, pairing=pairing, storage_options=cfg.storage_options))
    commit_file(f"{cfg.output.rstrip('/')}/{SUMMARY_JSON}", json.dumps(summary, indent=1, default=str).encode(), storage_options=cfg.storage_options)
    return summary


def _label_outcomes(cfg: SegmentConfig) -> dict:
    """How many images have a mask but no metrics, and why: no label paired, or a label refused.

    Each such image has a mask and an error row at stage `label` naming both files
    (pipeline/refine.py); up to 5 of each kind are quoted.
    """
    from segflow.pipeline.reader import read_errors

    rows = read_errors(cfg.output, columns=["uri", "stage", "reason"], storage_options=cfg.storage_options).to_pylist()
    rows = [r for r in rows if r["stage"] == "label"]
    unpaired = [r for r in rows if r["reason"].startswith("no label file")]
    rejected = [r for r in rows if not r["reason"].startswith("no label file")]
    return {
        "images_unpaired": len(unpaired), "images_rejected": len(rejected),
        "unpaired_examples": [redact(r["reason"]) for r in unpaired[:5]],
        "rejected_examples": [redact(r["reason"]) for r in rejected[:5]],
    }


def _provenance(cfg: SegmentConfig, plan: Plan) -> dict:
    """What produced an evaluation, for its report: model or checkpoint, refinement, inputs, date."""
    import datetime

    m = cfg.model
    params = plan.refinement.params
    return {
        "model": redact(m.checkpoint) if m.checkpoint else (m.model or "bundled CamVid FCN-8s"),
        "weights": m.weights, "model_fingerprint": plan.model_fingerprint, "job_fingerprint": plan.job_fingerprint,
        "refinement": plan.refinement.name, "refinement_parameters": asdict(params) if params is not None else None,
        "refinement_fingerprint": plan.refinement.fingerprint(), "precision": plan.precision,
        "images": redact(cfg.input), "labels": redact(cfg.evaluation.labels) if cfg.evaluation else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _scoring_context(cfg: SegmentConfig, plan: Plan):
    """What scoring a stored mask against its label needs (refine.RefineContext, no refiner)."""
    from segflow.models.labels import LabelSet
    from segflow.pipeline.refine import RefineContext

    labels = LabelSet.from_dict(plan.labels)
    pairing = _pairing(cfg, labels)
    return RefineContext(refiner=None, num_classes=labels.num_classes, flat_palette=tuple(labels.flat_palette()), fingerprints={},
                         evaluation=pairing, ignore_index=pairing.ignore_index, storage_options=cfg.storage_options)


def _pairing(cfg: SegmentConfig, labels):
    """The evaluation options with the void value filled in from the label set (CamVid: 11)."""
    from segflow.pipeline.evaluation.groundtruth import with_label_set_defaults

    return with_label_set_defaults(cfg.evaluation, labels) if cfg.evaluation is not None else None


def planned_precision(cfg: SegmentConfig) -> str:
    """The autocast the model actors will use: off, bf16 or fp16.

    It changes masks (bf16 agrees with fp32 on ~99.7 % of pixels), so it is part of the job
    fingerprint, and must be known when planning: `auto` means bf16 on a GPU and off on a
    CPU, so with `--device auto` planning asks whether the cluster has GPUs
    (`cluster.cluster_has_gpus`: no local Ray is started for it). The run stage checks that
    the actors it starts use this same precision.
    """
    if cfg.autocast != "auto":
        return cfg.autocast
    if cfg.device != "auto":
        return "bf16" if cfg.device == "cuda" else "off"
    from segflow.pipeline.cluster import cluster_has_gpus

    return "bf16" if cluster_has_gpus(cfg.ray_address) else "off"


def _resolve_refinement(cfg: SegmentConfig, model_meta: dict):
    """Each explicit parameter wins for itself; the rest are the checkpoint's tuned ones, then the kind's defaults.

    A checkpoint's `crf` metadata holds its tuned dense-CRF parameters (models/release.py),
    which every kind with the same parameter names (meanfield) takes in the same units;
    `refinements` may hold tuned parameters of a kind of its own, by kind name.
    """
    from segflow.models.crf import resolve_refinement

    tuned = (model_meta.get("refinements") or {}).get(cfg.refinement)
    if tuned is None:  # the dense CRF's tuned kernels: the mean-field kinds give them the same meaning
        tuned = model_meta.get("crf")
    return resolve_refinement(cfg.refinement, dict(cfg.crf_params), tuned)


def start_model_actors_early(cfg: SegmentConfig) -> None:
    """Start the job's model actors as soon as the local Ray begun in the background is up.

    For a job certain to run shards, whose model has been checked: see pipeline/prestart.py.
    """
    from segflow.pipeline import prestart
    from segflow.pipeline.cluster import wait_for_background_start

    prestart.begin(lambda: _actor_spec(cfg), wait_for_background_start)


def _actor_spec(cfg: SegmentConfig):
    """The model actors this job needs on the connected cluster."""
    from segflow.pipeline.cluster import plan_cluster
    from segflow.pipeline.engine import ActorSpec
    from segflow.pipeline.inference import InferenceOptions
    from segflow.pipeline.storage import storage_environment

    cluster = plan_cluster(cfg.device, cfg.model_actors, cfg.crf_workers)
    autocast = cfg.autocast if cfg.autocast != "auto" else ("bf16" if cluster.device == "cuda" else "off")
    options = InferenceOptions(
        device=cluster.device, threads=cluster.model_threads, batch_size=cfg.batch_size, decode_threads=cluster.decode_threads,
        autocast=autocast, channels_last=cfg.channels_last, compile=cfg.compile, max_pixels=cfg.max_pixels,
    )
    # Workers of a cluster that was already running do not have the driver's environment.
    return ActorSpec(cfg.model, options, cluster, cfg.storage_options, storage_environment())


def _execute(cfg: SegmentConfig, plan: Plan, replacer: Replacer | None = None):
    from segflow.models.labels import LabelSet
    from segflow.pipeline import prestart
    from segflow.pipeline.cluster import connect
    from segflow.pipeline.engine import ShardExecutor
    from segflow.pipeline.progress import ProgressBar
    from segflow.pipeline.refine import RefineContext

    connect(cfg.ray_address)
    spec = _actor_spec(cfg)
    if spec.inference.autocast != plan.precision:  # the fingerprint says how the masks were made
        raise ConfigError(
            f"the cluster would run the network with autocast {spec.inference.autocast}, but the plan (and the "
            f"fingerprint) assumed {plan.precision}; pass --autocast and --device explicitly"
        )
    labels = LabelSet.from_dict(plan.labels)
    fingerprints = {
        "job_fingerprint": plan.job_fingerprint,
        "model_fingerprint": plan.model_fingerprint,
        "crf_fingerprint": plan.refinement.fingerprint(),
    }
    pairing = _pairing(cfg, labels)
    context = RefineContext(
        refiner=plan.refinement if plan.refinement.params is not None else None,
        num_classes=labels.num_classes,
        flat_palette=tuple(labels.flat_palette()),
        fingerprints=fingerprints,
        evaluation=pairing,
        ignore_index=pairing.ignore_index if pairing is not None else labels.ignore_index,
        storage_options=cfg.storage_options,
        storage_env=spec.storage_env,
    )
    params = plan.refinement.params
    metadata = {**fingerprints, "labels": plan.labels, "crf": asdict(params) if params is not None else None}
    if plan.refinement.name != "dense":
        metadata["refinement"] = plan.refinement.name  # absent for dense: its files stay byte-identical
    executor = ShardExecutor(
        spec, context, cfg.output, metadata,
        max_in_flight=cfg.max_shards_in_flight, max_attempts=cfg.max_shard_attempts, actors=prestart.take(spec),
        replacer=replacer,
    )
    try:
        with ProgressBar(plan.to_process, enabled=cfg.progress) as bar:
            return executor.run(plan.shards, on_progress=bar.update)
    finally:
        executor.shutdown()
