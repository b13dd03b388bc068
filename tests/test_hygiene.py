"""The test suite leaves the user's machine as it found it (tests/conftest.py).

Prefect's home (database, profiles) and Ray's temporary files belong to the session's own
folder, which is removed at the end, and no test reaches a user's Prefect server or Ray
cluster named in their environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import SESSION_DIR

UNIX_SOCKET_PATH_MAX = 107


def test_prefect_keeps_its_database_and_profiles_in_the_sessions_folder():
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, PREFECT_HOME, PREFECT_PROFILES_PATH

    home = Path(PREFECT_HOME.value())
    assert home.is_relative_to(SESSION_DIR) and home != Path.home() / ".prefect"
    assert Path(PREFECT_PROFILES_PATH.value()).is_relative_to(SESSION_DIR)
    assert str(SESSION_DIR) in str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    assert PREFECT_API_URL.value() is None  # the CLI tests run on Prefect's ephemeral API, in that home
    assert os.environ["PREFECT_HOME"] == str(home)  # and so do the commands the tests start


def test_ray_keeps_its_sessions_logs_and_sockets_in_the_sessions_folder(ray_local):
    node = ray_local._private.worker.global_worker.node
    session = Path(node.get_session_dir_path())
    assert session.is_relative_to(SESSION_DIR), session
    sockets = [node.plasma_store_socket_name, node.raylet_socket_name]
    assert all(Path(s).is_relative_to(SESSION_DIR) and len(s) <= UNIX_SOCKET_PATH_MAX for s in sockets), sockets
    assert os.environ["RAY_TMPDIR"] == str(SESSION_DIR)  # the local Rays of the commands the tests start
    assert "RAY_ADDRESS" not in os.environ
