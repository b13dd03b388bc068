"""Where a process tree spends CPU and memory: a sampling thread over psutil.

`TreeMonitor(pid)` follows a process and every descendant (a local Ray's GCS, raylet,
agents and workers are all children of the driver). Each tick it records every process's
cumulative CPU seconds and RSS, and the machine's busy CPU time from /proc/stat, so a
window (`mark()` ... `mark()`) yields the tree's CPU seconds by role and the machine's.

Processes are grouped by what Ray's process titles say they run (`ray::ModelWorker`,
`ray::refine_item`, ...). A process that exits between two ticks loses at most one tick
of CPU time; the Ray processes that matter live until the job ends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

# Ray process titles and command lines -> the role reported (lower case; the first match wins).
ROLES = (
    ("modelworker", "model actor"),
    ("infer_shard", "model actor"),
    ("refine_item", "crf workers"),
    ("warm_up", "crf workers"),
    ("gcs_server", "ray gcs"),
    ("raylet", "ray raylet"),
    ("dashboard", "ray agents and monitors"),
    ("runtimeenv", "ray agents and monitors"),
    ("log_monitor", "ray agents and monitors"),
    ("monitor.py", "ray agents and monitors"),
    ("ray::", "ray workers (other)"),
)
GENERIC = ("other", "ray workers (other)")  # roles a process leaves once its title says more


@dataclass
class _Proc:
    role: str
    cpu: float = 0.0  # cumulative user + system seconds at the last tick
    rss: int = 0
    peak_rss: int = 0


@dataclass
class Window:
    """CPU seconds by role and machine-wide between two marks."""

    wall: float
    cpu_by_role: dict
    machine_busy: float
    cores: int

    @property
    def tree_cpu(self) -> float:
        return sum(self.cpu_by_role.values())

    def as_dict(self) -> dict:
        cap = self.wall * self.cores
        return {
            "wall_seconds": round(self.wall, 3),
            "tree_cpu_seconds": round(self.tree_cpu, 3),
            "tree_cpu_utilisation": round(self.tree_cpu / cap, 4) if cap else None,
            "machine_cpu_utilisation": round(self.machine_busy / cap, 4) if cap else None,
            # CPU used by processes outside the tree (another job on a shared machine): the
            # figures of a run where this is more than a few percent are not trustworthy
            "foreign_cpu_share": round(max(0.0, self.machine_busy - self.tree_cpu) / cap, 4) if cap else None,
            "cpu_seconds_by_role": {k: round(v, 3) for k, v in sorted(self.cpu_by_role.items())},
        }


@dataclass
class _Mark:
    t: float
    cpu: dict
    machine: float


@dataclass
class TreeMonitor:
    """Sample `pid` and its descendants every `interval` seconds until `stop()`."""

    pid: int
    interval: float = 0.25
    pss_interval: float | None = None  # also sum PSS this often (costs ~15 ms of CPU per process)
    procs: dict = field(default_factory=dict)
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    timeline_every: float = 5.0  # seconds between points of the RSS timeline
    timeline: list = field(default_factory=list)  # [seconds since start, {role: largest RSS MiB}]

    def __post_init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-monitor", daemon=True)
        self.root = psutil.Process(self.pid)
        self._last_pss = 0.0
        self._t0 = time.perf_counter()

    def start(self) -> "TreeMonitor":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> _Mark:
        """Sample now and return the counters, to difference with a later mark."""
        self.sample()
        with self._lock:
            return _Mark(time.perf_counter(), {pid: (p.role, p.cpu) for pid, p in self.procs.items()}, _machine_busy())

    def window(self, start: _Mark, end: _Mark) -> Window:
        by_role: dict[str, float] = {}
        for pid, (role, cpu) in end.cpu.items():
            before = start.cpu.get(pid, (role, 0.0))[1]
            by_role[role] = by_role.get(role, 0.0) + cpu - before
        return Window(end.t - start.t, by_role, end.machine - start.machine, psutil.cpu_count())

    def peak_rss(self) -> dict:
        """Peak RSS in MiB: the driver, the largest single worker per role, and the whole tree.

        RSS counts shared pages (the object store's shared memory, torch's libraries) in
        every process that maps them, so the tree's sum overstates physical memory; the
        PSS sum (with `pss_interval`) counts them once.
        """
        with self._lock:
            by_role: dict[str, int] = {}
            for pid, p in self.procs.items():
                if pid != self.pid:
                    by_role[p.role] = max(by_role.get(p.role, 0), p.peak_rss)
            driver = self.procs[self.pid].peak_rss if self.pid in self.procs else 0
        return {
            "driver_mib": _mib(driver),
            "largest_process_by_role_mib": {k: _mib(v) for k, v in sorted(by_role.items())},
            "tree_sum_mib": _mib(self.peak_tree_rss),
            **({"tree_pss_sum_mib": _mib(self.peak_tree_pss)} if self.pss_interval else {}),
        }

    def sample(self) -> None:
        try:
            members = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total_rss = 0
        with self._lock:
            for proc in members:
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss = proc.memory_info().rss
                        title = " ".join(proc.cmdline()[:3]) or proc.name()
                except psutil.Error:
                    continue
                known = self.procs.get(proc.pid)
                role = "driver" if proc.pid == self.pid else _role(title)
                if known is None:
                    known = self.procs[proc.pid] = _Proc(role)
                elif known.role in GENERIC and role != known.role and role != "other":
                    known.role = role  # a worker set its title, or an idle one took its first task
                known.cpu = times.user + times.system
                known.rss = rss
                known.peak_rss = max(known.peak_rss, rss)
                total_rss += rss
            self.peak_tree_rss = max(self.peak_tree_rss, total_rss)
            now = time.perf_counter() - self._t0
            if not self.timeline or now - self.timeline[-1][0] >= self.timeline_every:
                largest: dict[str, int] = {}
                for proc in members:
                    p = self.procs.get(proc.pid)
                    if p is not None:
                        largest[p.role] = max(largest.get(p.role, 0), p.rss)
                self.timeline.append([round(now, 1), {k: _mib(v) for k, v in sorted(largest.items())}])
        if self.pss_interval and time.perf_counter() - self._last_pss >= self.pss_interval:
            self._last_pss = time.perf_counter()
            self.peak_tree_pss = max(self.peak_tree_pss, _pss_sum(members))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _role(title: str) -> str:
    title = title.lower()
    for needle, role in ROLES:
        if needle in title:
            return role
    return "other"


def _pss_sum(members: list) -> int:
    """Proportional set size summed over the tree: shared pages counted once overall."""
    total = 0
    for proc in members:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def _mib(n: int) -> float:
    return round(n / 2**20, 1)
