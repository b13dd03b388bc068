"""Real Ray clusters for tests: `ray start` nodes on this machine, scoped to one temp dir.

`ray stop` stops every Ray on the machine, other people's included, so `RayCluster.stop`
stops only what its own `ray start` calls began: the processes whose command line names
its temp dir, and their descendants (worker processes, whose titles Ray rewrites to
`ray::...`). Token authentication stays on: the nodes and every driver share a fresh
token through RAY_AUTH_TOKEN (`env`), so no one else's ~/.ray/auth_token is involved.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


class RayCluster:
    """A head node, and any worker nodes added, on 127.0.0.1; `address` is what drivers pass."""

    def __init__(self):
        # short: Ray's Unix socket paths live under it and are limited to 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="sfray-", dir="/tmp"))
        self._ports: set[int] = set()
        self.port = self._new_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

    def start_head(self, num_cpus: int) -> None:
        # no autoscaler monitor and (in _ray_start) no log monitor: a fixed cluster on one machine,
        # whose drivers get failures as exceptions; ~0.75 CPU-s less per node, as segflow's own
        # local start (pipeline/batch_node.py)
        self._ray_start("--head", "--no-monitor", f"--port={self.port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
                        f"--dashboard-port={self._new_port()}", f"--ray-client-server-port={self._new_port()}")

    def add_node(self, num_cpus: int) -> None:
        self._ray_start(f"--address={self.address}", f"--num-cpus={num_cpus}")

    def _ray_start(self, *args: str) -> None:
        command = [
            RAY, "start", *args, "--include-log-monitor=false", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--num-gpus=0",
            f"--dashboard-agent-listen-port={self._new_port()}", "--object-store-memory=100000000", "--disable-usage-stats",
        ]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")

    def _new_port(self) -> int:
        """A free port this cluster has not handed out yet.

        `free_port` releases the port it found, and nothing binds the ones given to `ray start`
        until it runs, so two calls can return the same number: Ray then refuses to start
        ("port ... is used by other components"), as one CI run saw.
        """
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def pids(self) -> set[int]:
        """Every live process this cluster consists of (daemons and their descendants)."""
        table = process_table()
        roots = {pid for pid, (_, cmdline) in table.items() if str(self.temp_dir) in cmdline}
        return roots | descendants(roots, table)

    def stop(self, grace_s: float = 2.0) -> set[int]:
        """SIGTERM, then SIGKILL after `grace_s`, every process of this cluster; returns any survivors.

        The grace is short: Ray's GCS server and autoscaler monitor outlive a SIGTERM by more
        than 15 s here once the raylet is gone, so a longer grace only waited for the SIGKILL
        (10 s per cluster the suite stops).
        """
        pids = self.pids()
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while (alive := {p for p in pids if is_alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(alive | self.pids(), signal.SIGKILL)
        time.sleep(0.5)
        survivors = {p for p in pids | self.pids() if is_alive(p)}
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line with spaces) of every process visible in /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        table[int(name)] = (ppid, cmdline)
    return table


def descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found - roots
        found |= frontier
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def is_alive(pid: int) -> bool:
    """True while `pid` runs (an exited, unreaped zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
    except OSError:
        return False


class ProcessWatcher:
    """A background thread that polls the process table while a `with` block runs.

    Subclasses implement `poll()`, called every `poll_s` until the block ends or `done()`.
    """

    def __init__(self, poll_s: float = 0.02):
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=type(self).__name__, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        raise NotImplementedError

    def done(self) -> bool:
        return False

    def _watch(self) -> None:
        while not self._stop.is_set() and not self.done():
            self.poll()
            self._stop.wait(self.poll_s)
