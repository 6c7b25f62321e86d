"""Fixtures for every test folder: the cluster store on both backends (`store`), and the
private etcd behind it (`etcd_server`, tests/fleet_store.py). Every test under tests/lab
and tests/vagrant is marked `exclusive` (scripts/test runs those one at a time)."""
import os

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


_EXCLUSIVE_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), d) + os.sep
                        for d in ("lab", "vagrant"))


def pytest_collection_modifyitems(config, items):
    """Labs send real traffic with bounded waits (health checks, leases, floods): they get
    the machine to themselves. HP_TEST_PHASE=shared keeps only the other tests,
    HP_TEST_PHASE=exclusive only these (scripts/test runs the two phases; an -m of the
    user's own still applies)."""
    for item in items:
        if str(item.path).startswith(_EXCLUSIVE_DIRS):
            item.add_marker(pytest.mark.exclusive)
    phase = os.environ.get("HP_TEST_PHASE", "")
    if not phase:
        return
    if phase not in ("shared", "exclusive"):
        raise pytest.UsageError(f"HP_TEST_PHASE must be shared or exclusive, not {phase!r}")
    keep, drop = [], []
    for item in items:
        alone = item.get_closest_marker("exclusive") is not None
        (keep if alone == (phase == "exclusive") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
