"""Connecting to Ray and dividing the cluster between the model and the CRF.

On a GPU cluster: one model actor per GPU, CRF workers on the remaining CPUs, since the
CRF becomes the bottleneck once the network runs on a GPU.

On a CPU-only cluster: one single-threaded model actor per CPU, each refining its own
images (no CRF tasks; `crf_workers == 0`). Every core then runs one process that is
always busy, and an image's RGB and logits never leave the process that made them.
The earlier division, one model actor beside one CRF worker per core, kept three
processes busy on two cores: switching between them and the cache evictions made each
CRF ~7% slower (three CRF processes on two cores against two: 0.34 vs 0.32 CPU-s per
image), and Ray moved each image's pixels and logits between processes. `bench/run.py
--images 468` on 2 cores: 0.90 of the ideal images/s that way, 0.92-0.99 this way
(README, Performance). Single-threaded, because two intra-op threads cost more CPU per
image than they save (0.25 vs 0.15 CPU-s per image in the model actor).
Asking for CRF workers (`crf_workers >= 1`) restores the separate CRF tasks;
`crf_workers == 0` refines in the model actors on GPU clusters too.

Where the model actors would hold every CPU beside CRF workers (one-CPU nodes, or more
actors than cores), each holds less than one, so that CRF tasks still fit beside them
(`cpu_shares`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

from segflow.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterPlan:
    """How many actors and workers to start, and the Ray resources each asks for."""

    device: str
    model_actors: int
    model_num_cpus: float
    model_num_gpus: float
    model_threads: int
    decode_threads: int
    crf_workers: int
    crf_num_cpus: float
    nodes: int


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto", "ray://host:port"), or start a local one.

    Token authentication stays on: Ray (2.59+) generates a token for local clusters and
    keeps it in ~/.ray/auth_token; segflow refuses to run with it switched off.
    A local Ray begun by `start_local_ray_in_background` is waited for, then used.
    """
    wait_for_background_start()
    _connect(address)


_background_start: threading.Event | None = None  # set once the helper thread's start has ended


def start_local_ray_in_background() -> None:
    """Begin starting a local Ray in a helper thread, for a job certain to need it.

    A local Ray takes 3-5 s to start. The CLI begins it for a first run into an OUTPUT
    (which always has work) while the model is checked and Prefect's server boots;
    `connect` then finds it up. If it fails here, `connect` starts it again in the
    flow and reports the error there.

    The helper thread stays parked after the start, for the life of the process: Ray
    ties its local GCS and raylet to the thread that started them (Linux's parent-death
    signal follows the creating thread), so a thread that ended would take them with it.
    Ray installs its SIGTERM handler (exit, so that exit handlers stop the local Ray and
    Prefect's server) only from the main thread; it is installed here, in the caller's.
    """
    global _background_start
    import ray  # noqa: F401 - imported in this thread: two threads importing one package invite lock trouble

    logging.getLogger("ray._private.worker").addFilter(_drop_thread_sigterm_warning)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    _background_start = threading.Event()
    threading.Thread(target=_start_and_park, args=(_background_start,), name="ray-start", daemon=True).start()


def wait_for_background_start() -> None:
    """Return once a background start has ended (at once if none was begun); safe from several threads."""
    global _background_start
    started = _background_start
    if started is not None:
        started.wait()
        _background_start = None


def stop_background_start() -> None:
    """Wait for a background start, then stop that Ray (the job ended before using it)."""
    if _background_start is None:
        return
    wait_for_background_start()
    import ray

    ray.shutdown()


def _start_and_park(done: threading.Event) -> None:
    try:
        _connect(None)
    except Exception:  # noqa: BLE001 - connect() retries in the flow and reports the failure
        pass
    finally:
        done.set()
    threading.Event().wait()  # see start_local_ray_in_background: Ray's daemons live as long as this thread


def _drop_thread_sigterm_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ConfigError(
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: segflow keeps Ray's token authentication on; "
            "unset RAY_AUTH_MODE (or set it to token) and give remote clusters their token via RAY_AUTH_TOKEN"
        )
    # Ray announces token auth on every start and suggests disabling it; segflow wants it on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    kwargs = {"logging_level": logging.WARNING, "include_dashboard": False}
    try:
        if address is None:
            from segflow.pipeline.batch_node import without_unused_daemons

            with without_unused_daemons():  # no autoscaler, log monitor or API server: see batch_node.py
                ray.init(num_cpus=os.cpu_count(), log_to_driver=False, _system_config=_LOCAL_RAY_CONFIG, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ray.exceptions.AuthenticationError:
        raise ConfigError(f"--ray-address {address}: this process has no token for the cluster; {_TOKEN_FIX}") from None
    except ConnectionError as exc:
        # A wrong token looks the same as no cluster at all: Ray only says it failed to connect.
        raise ConfigError(
            f"--ray-address {address}: cannot connect to a Ray cluster ({exc}); check that one runs there "
            f"(`ray start --head`, or omit the flag for a local Ray) and that {_TOKEN_FIX}"
        ) from None


# No idle workers started ahead of demand: model actors always get fresh processes, and the
# engine warms its CRF workers itself, so prestarted workers only cost ~1.7 CPU-s of the
# start of a local Ray (measured on 2 cores: 3.1 instead of 4.8 CPU-s, ready in 2.6 s, not 4.3).
_LOCAL_RAY_CONFIG = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}

_TOKEN_FIX = (
    "RAY_AUTH_TOKEN (or the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) must hold the "
    "cluster's token, which `ray get-auth-token` prints on its head node"
)


def cluster_has_gpus(address: str | None) -> bool:
    """Whether the job's cluster has GPUs, without starting a local Ray.

    A local Ray (no `--ray-address`) gets this machine's GPUs: the ones CUDA_VISIBLE_DEVICES
    names when it is set (as Ray itself counts them), else the NVIDIA driver's list in
    /proc/driver/nvidia/gpus. A cluster given by address is asked (connecting to it).
    """
    if address is not None:
        import ray

        connect(address)
        return ray.cluster_resources().get("GPU", 0) > 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return any(d.strip() not in ("", "-1", "NoDevFiles") for d in visible.split(","))
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def plan_cluster(device: str, model_actors: int | None, crf_workers: int | None) -> ClusterPlan:
    """Size the model and CRF pools from the connected cluster's resources."""
    import ray

    resources = ray.cluster_resources()
    nodes = len([n for n in ray.nodes() if n.get("Alive")])
    return size_cluster(device, model_actors, crf_workers, float(resources.get("CPU", 1)), int(resources.get("GPU", 0)), nodes)


def size_cluster(device: str, model_actors: int | None, crf_workers: int | None, cpus: float, gpus: int, nodes: int = 1) -> ClusterPlan:
    """The model and CRF pools for a cluster of `cpus` CPUs and `gpus` GPUs (see the module docstring).

    `model_actors` / `crf_workers` None: the defaults for the hardware; `device`: auto, cpu or cuda.
    """
    if device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda: the Ray cluster has no GPUs; use --device auto or cpu")
    use_gpu = gpus > 0 and device != "cpu"
    if crf_workers == 0 or (crf_workers is None and not use_gpu):  # each model actor refines its own images
        actors = model_actors or (gpus if use_gpu else max(1, int(cpus)))
        share = 1.0 if actors <= cpus else max(0.01, math.floor(100 * cpus / actors) / 100)
        if use_gpu:
            return ClusterPlan("cuda", actors, share, 1.0, 1, 4, 0, 0.0, nodes)
        return ClusterPlan("cpu", actors, share, 0.0, 1, 1, 0, 0.0, nodes)
    if use_gpu:
        actors = model_actors or gpus
        workers = crf_workers or max(1, int(cpus) - actors)
        model_cpus, crf_cpus = cpu_shares(cpus, actors, workers)
        return ClusterPlan("cuda", actors, model_cpus, 1.0, 1, 4, workers, crf_cpus, nodes)
    actors = model_actors or 1
    model_cpus, crf_cpus = cpu_shares(cpus, actors, crf_workers)
    threads = max(1, int(cpus) // (4 * actors)) if cpus >= 8 else 1
    return ClusterPlan("cpu", actors, model_cpus, 0.0, threads, 1, crf_workers, crf_cpus, nodes)


def cpu_shares(cpus: float, actors: int, workers: int) -> tuple[float, float]:
    """Logical CPUs (per model actor, per CRF task) on a cluster of `cpus` CPUs.

    With CPUs to spare, a model actor holds one and the CRF tasks share the rest. Otherwise
    a model actor holds `cpus / (actors + 1)` and the CRF tasks share what remains: a
    CRF task asking for CPU where none is free would wait forever, and the job with it
    (two one-CPU nodes and two actors hung exactly so). Shares are rounded down to 1/100
    so that Ray's fixed-point sums of them never exceed a node.
    """
    if cpus > actors:
        return 1.0, max(0.01, (cpus - actors) / workers)
    model = max(0.01, math.floor(100 * cpus / (actors + 1)) / 100)
    return model, max(0.01, math.floor(100 * (cpus - actors * model) / workers) / 100)
