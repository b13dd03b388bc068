"""segflow's local Ray starts without the daemons a batch job never uses (pipeline/batch_node.py)."""

from __future__ import annotations

import json
import subprocess
import sys

# A fresh interpreter: the session's own local Ray (conftest's ray_local) lives in this one.
_START = """
import json, psutil, ray
from ray._private import node as ray_node
from segflow.pipeline import cluster
from segflow.pipeline.batch_node import UNUSED_DAEMONS
originals = {name: ray_node.Node.__dict__[name] for name in UNUSED_DAEMONS}
cluster.connect(None)
started = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
@ray.remote
def double(x):
    return 2 * x
answers = ray.get([double.remote(i) for i in range(4)])
restored = all(ray_node.Node.__dict__[name] is method for name, method in originals.items())
ray.shutdown()
print(json.dumps({"started": started, "answers": answers, "restored": restored,
                  "left": [p.pid for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]}))
"""


def test_a_local_start_runs_tasks_without_the_monitors_or_the_api_server(tmp_path):
    done = subprocess.run([sys.executable, "-c", _START], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    started = report["started"]
    assert any("gcs_server" in c for c in started) and any("raylet" in c for c in started), started
    for daemon in ("autoscaler/_private/monitor.py", "_private/log_monitor.py", "dashboard/dashboard.py"):
        assert not any(daemon in c for c in started), f"{daemon} was started: {started}"
    assert report["answers"] == [0, 2, 4, 6]
    assert report["restored"], "Ray's Node methods were left patched after the start"
    assert report["left"] == [], "ray.shutdown left processes of the local Ray running"
