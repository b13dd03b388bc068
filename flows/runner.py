"""How the CLI runs a job: through the Prefect flow (ephemeral API by default), then a summary."""

from __future__ import annotations

import contextlib
import logging
import threading

from segflow.pipeline import job
from segflow.pipeline.config import SegmentConfig


def preflight(cfg: SegmentConfig) -> threading.Thread | None:
    """Check what the user named before any flow runs, so mistakes cost one line.

    INPUT (and LABELS) must exist, OUTPUT must be writable, and the model must resolve: a
    registry name, a readable checkpoint whose header agrees with the model flags,
    torchvision weights that are cached or downloadable. All of that is checked before
    anything starts, so a mistake costs about a second and one line, not a Ray start and
    stop and a Prefect server (~12 s here). Then, for a first run, the local Ray starts and
    Prefect's temporary server boots (both quiet; Ray first, so that its daemons start on
    the core the driver leaves idle while it imports Prefect's server), and the model's
    actors start as soon as Ray is up. Fetching torchvision weights no longer overlaps
    Ray's start: a download takes far longer than the 3 s it could hide, and a cached
    file's hash check well under one.

    Returns the thread starting Prefect's server, for `_wait_for`.
    """
    from segflow.pipeline.listing import check_input

    check_input(cfg.input, cfg.storage_options)
    if cfg.evaluation is not None:
        check_input(cfg.evaluation.labels, cfg.storage_options)
    check_device(cfg)
    from segflow.storage import check_writable

    check_writable(cfg.output, cfg.storage_options)  # before any Ray, Prefect or model starts
    check_model(cfg)
    first_run = start_ray_for_first_run(cfg)
    try:
        api = start_ephemeral_api()
    except BaseException:
        from segflow.pipeline.cluster import stop_background_start

        stop_background_start()
        raise
    if first_run:
        job.start_model_actors_early(cfg)
    return api


def check_device(cfg: SegmentConfig) -> None:
    """--device cuda on a machine (or --ray-address cluster) without GPUs: one line now, not after Ray started."""
    if cfg.device != "cuda":
        return
    from segflow.errors import ConfigError
    from segflow.pipeline.cluster import cluster_has_gpus

    if not cluster_has_gpus(cfg.ray_address):
        where = f"the cluster at {cfg.ray_address}" if cfg.ray_address else "this machine (CUDA_VISIBLE_DEVICES, NVIDIA driver)"
        raise ConfigError(f"--device cuda: {where} has no GPU; use --device auto or --device cpu")


def check_model(cfg: SegmentConfig) -> None:
    from segflow.models.catalog import describe_model, fetch_weights

    m = cfg.model
    describe_model(m.model, m.checkpoint, m.weights, m.num_classes, m.seed, storage_options=cfg.storage_options)
    fetch_weights(m.model, m.weights)


def run_segment_job(cfg: SegmentConfig) -> job.RunSummary:
    """Run the segment flow and print its summary (also when it raises IncompleteRunError: cli.py's exit 1).

    A rerun with nothing to do ends before Prefect or Ray starts (`nothing_to_do`).
    """
    if (summary := nothing_to_do(cfg)) is not None:
        print_summary(summary)
        return summary
    api = preflight(cfg)
    from segflow.flows.segment import run_segment_flow

    _wait_for(api)
    with _summary_of_incomplete_run():
        summary = run_segment_flow(cfg)
    print_summary(summary)
    return summary


def nothing_to_do(cfg: SegmentConfig) -> job.RunSummary | None:
    """The summary of a rerun that has nothing to do, decided without Prefect, Ray or the model's weights; else None.

    A rerun of an unchanged collection used to cost ~14 s, most of it Prefect's temporary
    server, to learn that every image was up to date. Listing INPUT and reading OUTPUT's
    state columns is what the flow's first two stages do anyway, and costs a fraction of a
    second for thousands of images. It runs without OUTPUT's lock: it only reads, and a
    plan that finds any work (new, changed or refingerprinted images, images to retry,
    deletions to prune, a killed run's replacements to finish) goes the usual way, where
    the flow lists and plans again under the lock. So no flow run is recorded for a rerun
    that did nothing; a scheduled deployment, which runs the flow itself, always records one.
    First runs (nothing committed yet) skip the check: they always have work.
    """
    from segflow.pipeline.listing import check_input
    from segflow.pipeline.state import has_committed_shards

    if cfg.evaluation is not None or not has_committed_shards(cfg.output, cfg.storage_options):
        return None
    check_input(cfg.input, cfg.storage_options)
    plan = job.plan_stage(cfg, job.list_stage(cfg))
    if plan.shards or plan.drop_uris or plan.interrupted_replacements or plan.rescore:
        return None
    if plan.deleted:  # only the user can decide to prune: say so, as the flow's plan line does
        print(f"segflow: {plan.describe()}")
    from segflow.pipeline.engine import ExecutionStats

    return job.summarise_stage(cfg, plan, ExecutionStats())


def run_evaluate_job(cfg: SegmentConfig) -> tuple[job.RunSummary, dict]:
    api = preflight(cfg)
    from segflow.flows.evaluate import run_evaluate_flow

    _wait_for(api)
    with _summary_of_incomplete_run():
        summary, evaluation = run_evaluate_flow(cfg)
    print_summary(summary)
    print_evaluation(evaluation)
    return summary, evaluation


def start_ray_for_first_run(cfg: SegmentConfig) -> bool:
    """Start the local Ray now, beside Prefect's server, when the job is certain to need it.

    A first run into an OUTPUT (no committed shard yet) always has work; a rerun may have
    none, and then starts no Ray at all, so it waits for the plan (`run_shards`).
    Returns whether it started one.
    """
    from segflow.pipeline.cluster import start_local_ray_in_background
    from segflow.pipeline.state import has_committed_shards

    if cfg.ray_address is not None or has_committed_shards(cfg.output, cfg.storage_options):
        return False
    start_local_ray_in_background()
    return True


def start_ephemeral_api() -> threading.Thread | None:
    """Start Prefect's temporary API server in the background, when no PREFECT_API_URL is set.

    Otherwise the flow's first call starts it and waits ~4 s for it to answer: started
    here, it boots while the driver checks the model and imports the flow, and the first
    mask commits that much sooner. The flow then finds the same server (Prefect keeps one
    per process). Prefect's notices that it starts and
    stops a temporary server are dropped: a preflight error stays one line.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    global _ephemeral_server
    logging.getLogger("prefect").addFilter(_drop_temporary_server_notices)
    _ephemeral_server = SubprocessASGIServer()  # one per process: the flow finds this one
    starter = threading.Thread(target=_start_quietly, args=(_ephemeral_server,), name="prefect-api-start", daemon=True)
    starter.start()
    return starter


_ephemeral_server = None  # the temporary server start_ephemeral_api began, if any


def _start_quietly(server) -> None:
    try:
        server.start()
    except Exception:  # noqa: BLE001 - the flow starts it again, and reports what went wrong
        pass


def _wait_for(starter: threading.Thread | None) -> None:
    """Let the server finish starting: a flow calling it half-started would back off for seconds."""
    if starter is not None:
        starter.join()


def _drop_temporary_server_notices(record: logging.LogRecord) -> bool:
    return not (record.name == "prefect" and record.getMessage().startswith(("Starting temporary server", "Stopping temporary server")))


@contextlib.contextmanager
def _summary_of_incomplete_run():
    """Print the summary a run that ended with images to retry carries, then let its error through."""
    from segflow.errors import IncompleteRunError

    try:
        yield
    except IncompleteRunError as exc:
        if exc.summary is not None:
            print_summary(exc.summary)
        raise
    finally:
        _stop_services_first_at_exit()


def _stop_services_first_at_exit() -> None:
    """Once the flow has ended: at exit, stop Prefect's temporary server and Ray together, first.

    Python runs exit handlers last-registered first, and a CLI run ended with Ray's
    `shutdown` (a 0.5 s sleep "so that log messages finish printing", then SIGTERM and up
    to a second for each daemon: ~1.1-1.4 s here) and then Prefect's `stop` (SIGTERM,
    then a wait for uvicorn's graceful shutdown, ~1.3 s), one after the other. Registered
    after both, this handler runs first: it sends what Prefect still buffers (flow logs,
    events) and only signals the server, which then shuts down while Ray stops; Prefect's
    own handler reaps it, and Ray's finds nothing left to do. The flow has ended, so no
    worker has anything left to print and nothing talks to the API any more. A server
    Prefect did not start for this process (PREFECT_API_URL) is not touched. About 1.5 s
    less per run on this machine.
    """
    global _exit_handler_registered
    if _exit_handler_registered:
        return
    import atexit

    atexit.register(_stop_services)
    _exit_handler_registered = True


_exit_handler_registered = False


def _stop_services() -> None:
    from segflow.flows.stages import stop_ray_driver

    try:
        _signal_ephemeral_api()
    finally:
        stop_ray_driver()


def _signal_ephemeral_api() -> None:
    process = getattr(_ephemeral_server, "server_process", None)
    if process is None or process.poll() is not None:
        return
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    finally:
        process.terminate()


def print_summary(summary: job.RunSummary) -> None:
    print(f"segflow: {summary.describe()}")


def print_evaluation(evaluation: dict) -> None:
    raw, crf = evaluation.get("raw") or {}, evaluation.get("crf") or {}
    line = f"segflow: mIoU raw {_pct(raw.get('miou'))}"
    if crf:
        line += f", CRF {_pct(crf.get('miou'))} ({_signed(crf.get('miou'), raw.get('miou'))})"
    print(f"{line}; report: {evaluation.get('report')}")
    unlabelled = f"segflow: {evaluation.get('images_scored', 0)} images scored, {evaluation.get('images_rejected', 0)} rejected (label refused), " \
                 f"{evaluation.get('images_unpaired', 0)} unpaired (no label), {len(evaluation.get('unpaired_labels') or [])} labels without an image"
    print(unlabelled)
    for reason in [*evaluation.get("rejected_examples", []), *evaluation.get("unpaired_examples", [])][:5]:
        print(f"segflow:   {reason}")


def print_comparison(comparison: dict, output: str) -> None:
    """One line per refiner: its mIoU and gain over the raw masks, then where the comparison page is."""
    raw = comparison["raw"]["miou"]
    parts = [f"{kind} {_pct(part['scores']['miou'])} ({_signed(part['scores']['miou'], raw)})" for kind, part in comparison["refiners"].items()]
    print(f"segflow: mIoU raw {_pct(raw)}; " + ", ".join(parts) + f"; comparison: {output}/comparison.html")


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _signed(a, b) -> str:
    return "n/a" if a is None or b is None else f"{100 * (a - b):+.2f}"
