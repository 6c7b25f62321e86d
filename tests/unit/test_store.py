"""The cluster store's interface on both backends (the `store` fixture runs each test on a
file and on a private etcd): get/put/list/delete, compare-and-swap, update() under racing
writers, leases (expiry, refresh, revoke), watches (replay, order, read-then-watch,
compaction, timeouts), and the errors: damaged files, unreachable etcd, bad URLs."""
import base64
import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from fleet_store import start_etcd, stop_etcd
from hyperplane.errors import ConfigError, StoreError
from hyperplane.fleet.etcd import EtcdStore
from hyperplane.fleet.store import (Entry, FileStore, LeaseExpired, StoreConflict,
                                    WatchCompacted, open_store)


def _etcd(store) -> bool:
    return isinstance(store, EtcdStore)


def _ttl(store) -> float:
    # etcd's shortest lease is 1 s (whole seconds; the test etcd's minimum), a file's any.
    return 1 if _etcd(store) else 0.3


def _expiry_slack(store) -> float:
    # etcd's leader revokes expired leases every 500 ms; a file watch reaps on its poll.
    return 2.5 if _etcd(store) else 0.5


def _threads(*targets):
    """Run targets in threads; re-raise the first exception one of them raised."""
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a writer thread hung"
    if errors:
        raise errors[0]


# --- keys and values ---------------------------------------------------------------------

def test_put_get_list_delete(store):
    r1 = store.put("/nodes/n1", {"ip": "10.0.0.1"})
    r2 = store.put("/nodes/n2", {"ip": "10.0.0.2"})
    r3 = store.put("/nodes", "not under /nodes/")
    assert r1 < r2 < r3 == store.revision()
    assert store.get("/nodes/n1") == Entry("/nodes/n1", {"ip": "10.0.0.1"}, r1, None)
    assert store.get("/nodes/n3") is None
    listing = store.list("/nodes/")
    assert list(listing) == ["/nodes/n1", "/nodes/n2"] and listing.revision == r3
    assert listing["/nodes/n2"].value == {"ip": "10.0.0.2"}
    assert set(store.list()) == {"/nodes", "/nodes/n1", "/nodes/n2"}
    r4 = store.put("/nodes/n1", {"ip": "10.0.0.9"})
    assert store.get("/nodes/n1") == Entry("/nodes/n1", {"ip": "10.0.0.9"}, r4, None)
    assert store.delete("/nodes/n1") is True
    assert store.delete("/nodes/n1") is False
    assert store.get("/nodes/n1") is None and list(store.list("/nodes/")) == ["/nodes/n2"]
    assert store.revision() == r4 + 1


@pytest.mark.parametrize("value", [None, True, 0, -3, 1.5, "ü", [1, [2, "x"]],
                                   {"a": {"b": [None, {}]}}])
def test_any_json_value_comes_back_as_it_was(store, value):
    store.put("/v", value)
    assert store.get("/v").value == value


def test_what_json_cannot_hold_is_refused_and_changes_nothing(store):
    before = store.revision()
    with pytest.raises(ConfigError, match="/bad cannot be stored: it is not JSON"):
        store.put("/bad", {1, 2})
    with pytest.raises(ConfigError, match="not JSON"):
        store.cas("/bad", float("nan"), revision=0)
    with pytest.raises(ConfigError, match="store key"):
        store.put("", 1)
    assert store.revision() == before and store.get("/bad") is None


# --- compare-and-swap and update ---------------------------------------------------------

def test_cas_creates_only_what_is_absent_and_changes_only_at_its_revision(store):
    assert store.cas("/k", 1, revision=0)
    first = store.get("/k").revision
    assert not store.cas("/k", 2, revision=0)            # it exists
    assert not store.cas("/k", 2, revision=first + 100)  # not its revision
    assert store.get("/k") == Entry("/k", 1, first, None)
    assert store.cas("/k", 2, revision=first)
    second = store.get("/k").revision
    assert second > first and not store.cas("/k", 3, revision=first)   # stale
    assert not store.delete("/k", revision=first)
    assert store.get("/k").value == 2
    assert store.delete("/k", revision=second)
    assert store.get("/k") is None and store.cas("/k", 4, revision=0)   # absent again


def test_two_writers_racing_on_one_revision_one_wins(store):
    store.put("/k", "start")
    revision = store.get("/k").revision
    barrier = threading.Barrier(2)
    won = {}

    def writer(name):
        def run():
            with open_store(store.url) as mine:   # its own client, as another process
                barrier.wait(5)
                won[name] = mine.cas("/k", name, revision=revision)
        return run
    _threads(writer("a"), writer("b"))
    assert sorted(won.values()) == [False, True], won
    assert store.get("/k").value == next(name for name, ok in won.items() if ok)


def test_update_loses_no_write_among_racing_writers(store):
    per_thread, threads = 20, 3
    calls = []

    def worker():
        with open_store(store.url) as mine:
            for _ in range(per_thread):
                mine.update("/counter", lambda v: calls.append(v) or v + 1, default=0)
    _threads(*[worker] * threads)
    assert store.get("/counter").value == per_thread * threads
    assert len(calls) >= per_thread * threads


def test_update_gives_up_with_a_clear_error_when_it_never_wins(store):
    store.UPDATE_TRIES = 3
    calls = []

    def meddled(value):  # someone else writes between every read and write
        calls.append(value)
        store.put("/k", len(calls))
        return "mine"
    with pytest.raises(StoreConflict, match=r"could not update /k in the store .* 3 times"):
        store.update("/k", meddled, default=0)
    assert len(calls) == 3 and store.get("/k").value == 3


def test_update_starts_from_a_copy_of_the_default(store):
    default = {"items": []}
    assert store.update("/d", lambda v: v["items"].append(1) or v, default=default) == \
        {"items": [1]}
    assert default == {"items": []} and store.get("/d").value == {"items": [1]}


# --- leases ---------------------------------------------------------------------------------

def test_lease_expiry_deletes_its_keys_and_a_watcher_sees_it(store):
    ttl = _ttl(store)
    granted = time.monotonic()
    lease = store.lease(ttl)
    assert lease.ttl_s == ttl
    store.put("/nodes/n1", {"up": True}, lease=lease)
    store.put("/nodes/n2", {"up": True})
    assert store.get("/nodes/n1").lease == lease.id
    with store.watch("/nodes/") as watch:
        event = watch.next(timeout=ttl + _expiry_slack(store))
        assert event is not None, "no delete seen after the lease expired"
        assert (event.type, event.entry.key) == ("delete", "/nodes/n1")
        assert time.monotonic() - granted >= ttl - 0.05
    assert store.get("/nodes/n1") is None and store.get("/nodes/n2").value == {"up": True}
    with pytest.raises(LeaseExpired, match=f"lease {lease.id} .*expired"):
        lease.refresh()
    with pytest.raises(LeaseExpired, match="grant a new lease"):
        store.put("/nodes/n1", {"up": True}, lease=lease)
    lease.revoke()   # already gone: no error


def test_refresh_keeps_a_leases_keys_and_revoke_ends_them(store):
    ttl = _ttl(store)
    lease = store.lease(ttl)
    store.put("/nodes/n1", 1, lease=lease)
    end = time.monotonic() + 1.3 * ttl
    while time.monotonic() < end:
        lease.refresh()
        assert store.get("/nodes/n1") is not None, "the key went while its lease was refreshed"
        time.sleep(ttl / 4)
    store.update("/nodes/n1", lambda v: v + 1)    # an update keeps the key's lease
    assert store.get("/nodes/n1").lease == lease.id
    lease.revoke()
    assert store.get("/nodes/n1") is None


def test_a_lease_ttl_must_be_positive(store):
    for ttl in (0, -1, float("nan"), "5"):
        with pytest.raises(ConfigError, match="lease TTL"):
            store.lease(ttl)


# --- watches ---------------------------------------------------------------------------------

def test_watch_replays_every_change_from_a_revision_in_order(store):
    start = store.revision() + 1
    store.put("/w/a", 1)
    store.put("/x", "not under /w/")
    store.put("/w/b", 2)
    store.put("/w/a", 3)
    store.delete("/w/b")
    with store.watch("/w/", start_revision=start) as watch:
        got = [watch.next(timeout=2) for _ in range(4)]
        assert None not in got, got
        assert [(e.type, e.entry.key, e.entry.value) for e in got] == [
            ("put", "/w/a", 1), ("put", "/w/b", 2), ("put", "/w/a", 3), ("delete", "/w/b", None)]
        revisions = [e.revision for e in got]
        assert revisions == sorted(set(revisions)) and revisions[0] == start
        assert watch.next(timeout=0.1) is None        # nothing more: a timeout, no hang
        revision = store.put("/w/c", 4)
        event = watch.next(timeout=2)
        assert (event.type, event.entry.key, event.revision) == ("put", "/w/c", revision)
    assert watch.next(timeout=0.1) is None            # cancelled


def test_a_waiting_watch_wakes_for_a_change_and_for_cancel(store):
    watch = store.watch("/w/")
    threading.Timer(0.1, lambda: store.put("/w/late", 1)).start()
    t0 = time.monotonic()
    event = watch.next(timeout=10)
    assert event is not None and event.entry.key == "/w/late" and time.monotonic() - t0 < 3
    threading.Timer(0.1, watch.cancel).start()
    t0 = time.monotonic()
    assert watch.next(timeout=10) is None and time.monotonic() - t0 < 3
    assert list(watch) == []


def test_read_then_watch_from_its_revision_misses_nothing(store):
    changes = 300
    started = threading.Event()

    def writer():
        with open_store(store.url) as mine:
            for i in range(changes):
                key = f"/r/{i % 7}"
                mine.delete(key) if i % 5 == 4 else mine.put(key, i)
                if i == 10:
                    started.set()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert started.wait(10)
        listing = store.list("/r/")                      # a read in the middle of the writes
        state = {key: e.value for key, e in listing.items()}
        time.sleep(0.05)                                 # more writes before the watch starts
        watch = store.watch("/r/", start_revision=listing.revision + 1)
    finally:
        thread.join(30)
    final = store.list("/r/")
    seen = listing.revision
    while seen < final.revision:
        event = watch.next(timeout=5)
        assert event is not None, f"the watch stopped at revision {seen} of {final.revision}"
        # one writer, one revision per change: every revision must come, in order
        assert event.revision == seen + 1, f"revisions {seen + 1}..{event.revision - 1} missed"
        seen = event.revision
        if event.type == "put":
            state[event.entry.key] = event.entry.value
        else:
            del state[event.entry.key]
    watch.cancel()
    assert state == {key: e.value for key, e in final.items()}


def test_a_watch_from_compacted_history_raises_watch_compacted(store):
    first = store.revision() + 1
    if not _etcd(store):
        store = FileStore(store.path, log_events=4)    # the file's log keeps 4 changes
    for i in range(10):
        store.put("/c", i)
    if _etcd(store):
        store.compact(store.revision())
    with pytest.raises(WatchCompacted, match="read the keys again and watch from"):
        store.watch("/c", start_revision=first).next(timeout=5)
    last = store.revision()
    with store.watch("/c", start_revision=last) as watch:   # what is left still replays
        event = watch.next(timeout=2)
        assert event is not None and (event.entry.value, event.revision) == (9, last)


# --- the file backend --------------------------------------------------------------------------

def test_a_file_watch_that_falls_behind_the_log_raises_watch_compacted(tmp_path):
    store = FileStore(str(tmp_path / "s.json"), log_events=3)
    watch = store.watch("/")
    for i in range(6):
        store.put("/k", i)
    with pytest.raises(WatchCompacted, match="no longer holds the changes"):
        watch.next(timeout=1)


def test_the_file_log_is_bounded_in_bytes_too(tmp_path):
    store = FileStore(str(tmp_path / "s.json"), log_bytes=1000)
    for i in range(10):
        store.put("/big", "x" * 300)
    with open(store.path) as f:
        assert len(json.load(f)["log"]) == 3
    with pytest.raises(WatchCompacted):
        store.watch("/", start_revision=1)


def test_a_file_store_that_went_back_is_reported_to_its_watchers(tmp_path):
    store = FileStore(str(tmp_path / "s.json"))
    for i in range(3):
        store.put("/k", i)
    watch = store.watch("/")
    os.unlink(store.path)          # removed, and a new store started in its place
    store.put("/k", "new")
    with pytest.raises(WatchCompacted, match="went back from revision 3 to 1"):
        watch.next(timeout=1)


def test_file_leases_of_an_earlier_boot_have_expired(tmp_path):
    store = FileStore(str(tmp_path / "s.json"))
    lease = store.lease(3600)
    store.put("/k", 1, lease=lease)
    store.put("/j", 2)
    with open(store.path) as f:
        data = json.load(f)
    data["boot_id"] = "an earlier boot"        # monotonic times from then mean nothing now
    with open(store.path, "w") as f:
        json.dump(data, f)
    assert store.get("/k") is None and store.get("/j").value == 2
    with pytest.raises(LeaseExpired):
        lease.refresh()


DAMAGED = [
    (b'{"revision": 1, "keys": {', "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    (b"[]", "must hold a JSON object, not list"),
    (b'{"load_balancers": []}', "is not a hyperplane store file (revision must be"),
    (json.dumps({"revision": 2, "compact_revision": 0, "next_lease": 1, "boot_id": "",
                 "keys": {"/k": {"value": 1}}, "leases": {}, "log": []}).encode(),
     "key '/k' needs value, mod_revision"),
    (json.dumps({"revision": 2, "compact_revision": 0, "next_lease": 1, "boot_id": "",
                 "keys": {}, "leases": {"1": {"expires": "soon"}}, "log": []}).encode(),
     "lease '1' needs ttl_s and expires"),
]


@pytest.mark.parametrize("content, words", DAMAGED,
                         ids=["truncated", "empty", "not UTF-8", "array", "an NLB document",
                              "bad key", "bad lease"])
def test_a_damaged_file_is_one_clear_error_and_left_alone(tmp_path, content, words):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    store = FileStore(str(path))
    calls = [lambda: store.get("/k"), lambda: store.list(), lambda: store.put("/k", 1),
             lambda: store.cas("/k", 1, revision=0), lambda: store.delete("/k"),
             lambda: store.lease(5), lambda: store.watch("/"), store.revision,
             lambda: store.update("/k", lambda v: v, default=0)]
    for call in calls:
        with pytest.raises(StoreError) as exc:
            call()
        message = str(exc.value)
        assert str(path) in message and words in message and "\n" not in message, message
    assert path.read_bytes() == content


def test_a_file_store_in_a_place_it_cannot_write_is_a_store_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot use the store"):
        FileStore(str(blocker / "s.json")).put("/k", 1)


# --- the etcd backend --------------------------------------------------------------------------

def test_an_unreachable_etcd_is_a_store_error_at_once():
    with socket.socket() as bound:    # bound, never listening: connections are refused, and
        bound.bind(("127.0.0.1", 0))  # no other process (another test's etcd) can take it
        _store_errors_at_once(open_store(f"etcd://127.0.0.1:{bound.getsockname()[1]}",
                                         timeout_s=1))


def _store_errors_at_once(store):
    for call in (lambda: store.get("/k"), lambda: store.put("/k", 1), store.revision,
                 lambda: store.lease(5), lambda: store.watch("/")):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="connect|is etcd running") as exc:
            call()
        assert time.monotonic() - t0 < 1.5 and "\n" not in str(exc.value)


def test_an_etcd_that_never_answers_is_a_store_error_after_the_timeout():
    with socket.socket() as silent:   # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = open_store(f"etcd://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.2)
        for call in (lambda: store.get("/k"), lambda: store.watch("/")):
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="did not answer within 0.2 s"):
                call()
            assert time.monotonic() - t0 < 2


def test_a_watch_reports_an_etcd_that_went_away():
    server = start_etcd()
    try:
        store = open_store(server.url)
        watch = store.watch("/")
        store.put("/k", 1)
        assert watch.next(timeout=5).entry.key == "/k"
        stop_etcd(server)
        with pytest.raises(StoreError, match="watch on the etcd store .* (ended|broke)"):
            watch.next(timeout=10)
        with pytest.raises(StoreError, match="cannot connect"):
            store.get("/k")
    finally:
        stop_etcd(server)


def test_a_key_that_etcd_holds_in_another_format_is_a_clear_error(etcd_server):
    body = json.dumps({"key": base64.b64encode(b"/odd").decode(),
                       "value": base64.b64encode(b"not json").decode()}).encode()
    urllib.request.urlopen(urllib.request.Request(etcd_server.http + "/v3/kv/put", data=body),
                           timeout=5).read()
    with open_store(etcd_server.url) as store:
        with pytest.raises(StoreError, match="key /odd in the etcd store .* does not hold JSON"):
            store.get("/odd")


# --- URLs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, backend, where", [
    ("/run/x/store.json", FileStore, "file:/run/x/store.json"),
    ("relative.json", FileStore, "file:relative.json"),
    ("file:/a/b.json", FileStore, "file:/a/b.json"),
    ("file:///a/b.json", FileStore, "file:/a/b.json"),
    ("etcd://127.0.0.1:23790", EtcdStore, "etcd://127.0.0.1:23790"),
    ("etcd://etcd1", EtcdStore, "etcd://etcd1:2379"),
])
def test_open_store_picks_the_backend_from_the_url(url, backend, where):
    store = open_store(url)      # opening does no I/O
    assert isinstance(store, backend) and store.url == where


@pytest.mark.parametrize("url", ["", "http://127.0.0.1:2379", "etcd://", "etcd://h:port",
                                 "etcd://h:1/path", "file://elsewhere/x.json"])
def test_a_bad_store_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="store"):
        open_store(url)
