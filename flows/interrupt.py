"""Ctrl-C that ends the command, even when it also stopped Prefect's ephemeral API.

A terminal sends Ctrl-C's SIGINT to the whole foreground process group: segflow, Ray's
processes, and the server behind Prefect's ephemeral API (a child process). The server
stops, and then Prefect's own handling of the interrupt (marking the flow run crashed,
shipping the last log lines) retries against it with exponential backoff and, at exit,
waits without a time limit: the command hung after Ctrl-C.

So segflow's SIGINT handler first looks at the ephemeral server. If it is stopping too,
nothing more can be recorded in Prefect, and every committed shard is already complete
on storage: it prints the resume hint, stops the local Ray cluster (its dashboard and
runtime-env agents would outlive a bare exit) and leaves at once (`os._exit`). If the
server is alive (only segflow was signalled, or the API is a real server), it raises
KeyboardInterrupt as usual, and Prefect records the interruption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

MESSAGE = "segflow: interrupted; committed shards are kept, rerun the same command to resume"
EXIT_CODE = 130
SERVER_GRACE_SECONDS = 3.0  # how long a signalled server may take to stop
RAY_SHUTDOWN_SECONDS = 10.0


def install() -> None:
    """Use `on_interrupt` for SIGINT (the main thread only: signals are delivered there)."""
    signal.signal(signal.SIGINT, on_interrupt)


def on_interrupt(signum, frame) -> None:
    server = ephemeral_server_process()
    if server is None or not _stops_within(server, SERVER_GRACE_SECONDS):
        raise KeyboardInterrupt
    print(MESSAGE, file=sys.stderr)
    _stop_ray(RAY_SHUTDOWN_SECONDS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def ephemeral_server_process() -> subprocess.Popen | None:
    """The process of the ephemeral API server this process started, if any."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:  # Prefect never started one: a configured PREFECT_API_URL, or too early
        return None
    server = server_module.SubprocessASGIServer._instances.get(None)
    return getattr(server, "server_process", None)


def _stop_ray(seconds: float) -> None:
    """`stages.stop_ray_driver` in a helper thread, given `seconds`: the interrupted main
    thread may hold a lock of Ray's, and a stuck shutdown must not keep the command from ending."""
    import threading

    from segflow.flows.stages import stop_ray_driver

    stopper = threading.Thread(target=stop_ray_driver, name="ray-shutdown", daemon=True)
    stopper.start()
    stopper.join(seconds)


def _stops_within(process: subprocess.Popen, seconds: float) -> bool:
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True
