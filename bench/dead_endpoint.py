"""What a dead S3 endpoint costs before segflow gives up: HTTP attempts and seconds.

    python bench/dead_endpoint.py

Starts the test suite's real moto S3 server, creates a bucket with one image, stops the
server, then times `list_inputs` (the engine's first storage call) and the whole CLI
(`segflow segment s3://... s3://...`) against the stopped endpoint, counting HTTP attempts
(aiobotocore's per-attempt send). Prints one JSON line; docs/storage.md quotes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_COUNTED_CLI = """
import sys, aiobotocore.endpoint as e
attempts = [0]
send = e.AioEndpoint._send
async def counted(self, *a, **k):
    attempts[0] += 1
    return await send(self, *a, **k)
e.AioEndpoint._send = counted
import atexit
atexit.register(lambda: print("attempts", attempts[0], file=sys.stderr))
from segflow.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def main() -> int:
    import aiobotocore.endpoint as endpoint

    from tests.s3_fixtures import FAKE_KEY, FAKE_SECRET, REGION, MotoServer

    server = MotoServer()
    server.start()
    server.admin_fs.mkdir("dead")
    server.admin_fs.pipe_file("dead/in/x.png", b"not really a png")
    server.stop()
    env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": FAKE_KEY,
           "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)

    attempts = [0]
    send = endpoint.AioEndpoint._send

    async def counted(self, *args, **kw):
        attempts[0] += 1
        return await send(self, *args, **kw)

    endpoint.AioEndpoint._send = counted
    from segflow.errors import StorageError
    from segflow.pipeline.listing import list_inputs

    t0 = time.perf_counter()
    try:
        list_inputs("s3://dead/in/")
        outcome = "listed?!"
    except StorageError as exc:
        outcome = str(exc).splitlines()[0][:160]
    listing = {"attempts": attempts[0], "seconds": round(time.perf_counter() - t0, 1), "error": outcome}

    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "-c", _COUNTED_CLI, "segment", "s3://dead/in/", "s3://dead/out", "--no-progress"],
                         env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    cli_attempts = next((int(line.split()[1]) for line in lines if line.startswith("attempts ")), None)
    print(json.dumps({"list_inputs": listing, "cli": {"exit": cli.returncode, "seconds": round(time.perf_counter() - t0, 1),
                      "attempts": cli_attempts, "stderr_lines": len(lines), "last": lines[-2:] }}))
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
