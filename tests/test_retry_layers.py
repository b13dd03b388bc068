"""One retry layer: a dead S3 endpoint costs `with_retries`' 5 attempts and a few seconds, then one line.

Against the suite's real moto server, stopped. HTTP attempts are counted at aiobotocore's
per-attempt send; before, botocore's own retries (5 per call) ran under segflow's 5, and
Prefect's task retries (4) above them.
"""

from __future__ import annotations

import time

import pytest

from segflow.errors import StorageError
from segflow.pipeline.listing import list_inputs


def test_a_dead_endpoint_costs_five_attempts_and_seconds_then_one_line(s3_server, s3_bucket, monkeypatch):
    import aiobotocore.endpoint as endpoint

    s3_bucket.fs().pipe_file(f"{s3_bucket.name}/in/x.png", b"x")
    attempts = []
    send = endpoint.AioEndpoint._send

    async def counted(self, *args, **kw):
        attempts.append(time.monotonic())
        return await send(self, *args, **kw)

    monkeypatch.setattr(endpoint.AioEndpoint, "_send", counted)
    s3_server.stop()
    started = time.monotonic()
    with pytest.raises(StorageError, match="storage still failing after 5 attempts") as failure:
        list_inputs(f"{s3_bucket.url}/in/")
    seconds = time.monotonic() - started
    assert len(attempts) == 5, f"{len(attempts)} HTTP attempts"
    assert seconds < 10, f"{seconds:.1f} s"
    assert len(str(failure.value).splitlines()) == 1


def test_the_flows_storage_tasks_do_not_retry_again():
    from segflow.flows import stages

    assert stages.list_inputs.retries == 0 and stages.plan_work.retries == 0
