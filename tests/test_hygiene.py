"""The test suite leaves the user's machine as it found it (tests/conftest.py).

Prefect's home (database, profiles) and Ray's temporary files belong to the session's own
folder, which is removed at the end, and no test reaches a user's Prefect server or Ray
cluster named in their environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SESSION_DIR

UNIX_SOCKET_PATH_MAX = 107


def test_prefect_keeps_its_database_and_profiles_in_the_sessions_folder():
    """What Prefect resolves in the environment every command a test starts inherits.

    Checked in a fresh interpreter: in this one, the session's `prefect_server` fixture
    (once some test has used it) points Prefect at that server and its own home, a
    temporary folder of the session too, for the rest of the session.
    """
    code = (
        "import json\n"
        "from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, PREFECT_HOME, PREFECT_PROFILES_PATH\n"
        "print(json.dumps([str(PREFECT_HOME.value()), str(PREFECT_PROFILES_PATH.value()), str(PREFECT_API_DATABASE_CONNECTION_URL.value()), PREFECT_API_URL.value()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, check=True)
    home, profiles, database, api_url = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(home).is_relative_to(SESSION_DIR) and Path(home) != Path.home() / ".prefect"
    assert Path(profiles).is_relative_to(SESSION_DIR)
    assert str(SESSION_DIR) in database
    assert api_url is None  # the CLI tests run on Prefect's ephemeral API, in that home
    assert os.environ["PREFECT_HOME"] == home


def test_ray_keeps_its_sessions_logs_and_sockets_in_the_sessions_folder(ray_local):
    node = ray_local._private.worker.global_worker.node
    session = Path(node.get_session_dir_path())
    assert session.is_relative_to(SESSION_DIR), session
    sockets = [node.plasma_store_socket_name, node.raylet_socket_name]
    assert all(Path(s).is_relative_to(SESSION_DIR) and len(s) <= UNIX_SOCKET_PATH_MAX for s in sockets), sockets
    assert os.environ["RAY_TMPDIR"] == str(SESSION_DIR)  # the local Rays of the commands the tests start
    assert "RAY_ADDRESS" not in os.environ
