"""Fixtures for every test folder: the cluster store on both backends (`store`), and the
private etcd behind it (`etcd_server`, tests/fleet_store.py)."""
import pytest

from fleet_store import etcd_server, wipe  # noqa: F401  (a pytest fixture)
from hyperplane.fleet.store import FileStore, open_store

STORE_BACKENDS = ["file", "etcd"]


@pytest.fixture(params=STORE_BACKENDS)
def store(request, tmp_path):
    """An empty store: a file in tmp_path, or the session's private etcd with every key
    deleted. A test on it runs once per backend."""
    if request.param == "file":
        s = FileStore(str(tmp_path / "store.json"), poll_s=0.01)
    else:
        server = request.getfixturevalue("etcd_server")
        wipe(server)
        s = open_store(server.url)
    try:
        yield s
    finally:
        s.close()
