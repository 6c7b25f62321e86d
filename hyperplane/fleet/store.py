"""The cluster store: one interface over two backends, a JSON file for one host (here) and
etcd for a cluster of hosts (hyperplane.fleet.etcd). `open_store(url)` picks the backend.

Keys are strings ("/nlb", "/nodes/node1"); values are JSON-able Python objects. Every
change bumps the store's revision; each key remembers the revision that last changed it
(its mod revision), which is what compare-and-swap compares (revision 0: the key must be
absent). Keys put with a lease vanish when the lease expires, and watchers see a delete.
A watch delivers every change after a revision, in order: read with list() (the listing's
.revision), watch from that revision + 1, and nothing is missed. When the history a watch
needs is gone, it raises WatchCompacted: read again and watch from the new read.

A store that cannot be reached, read or parsed raises StoreError (a ConfigError: hpctl
prints it as one sentence and exits 2), never a traceback.

Keys in use today:
  /nlb    the NLB configuration (hyperplane.nlb.config.NlbConfig.to_dict()); hpctl lb
          writes it, the node agent applies it.
"""
from __future__ import annotations

import copy
import fcntl
import json
import math
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from hyperplane.errors import ConfigError, EnvironmentProblem, StoreError

# One host's store: hpctl and the agents find it here without being told.
DEFAULT_STORE = "/run/hyperplane/store/nlb.json"
NLB_KEY = "/nlb"

# How long a request to a remote store (etcd) may take before it is an error.
DEFAULT_TIMEOUT_S = 5.0


class WatchCompacted(StoreError):
    """The changes a watch asked for are no longer in the store's history."""

    def __init__(self, message: str, compact_revision: int):
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseExpired(StoreError):
    """The lease expired (or was revoked): its keys are gone; grant a new one."""


class StoreConflict(StoreError):
    """update() lost the compare-and-swap race every time it tried."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any                 # None in a delete event
    revision: int              # the key's mod revision (in a delete event: the delete's)
    lease: int | None = None


@dataclass(frozen=True)
class Event:
    type: str                  # "put" or "delete"
    entry: Entry

    @property
    def revision(self) -> int:
        return self.entry.revision


class Listing(dict):
    """list()'s answer: key -> Entry, and the store revision the read saw (watch from
    .revision + 1 to miss nothing after it)."""

    def __init__(self, entries: dict[str, Entry], revision: int):
        super().__init__(entries)
        self.revision = revision


class Lease(ABC):
    id: int
    ttl_s: float               # what the store granted (etcd may raise a short TTL)

    @abstractmethod
    def refresh(self) -> None:
        """Start the TTL again; LeaseExpired when it already ran out."""

    @abstractmethod
    def revoke(self) -> None:
        """End the lease now: its keys are deleted. Revoking an expired lease is no error."""


class Watch(ABC):
    """Changes under a prefix, in revision order. `next(timeout)` waits at most timeout
    seconds (None: until a change) and returns None on timeout or after cancel(); it
    raises StoreError when the store fails and WatchCompacted when the history it needs
    is gone. Iterating blocks until the next change and stops after cancel()."""

    @abstractmethod
    def next(self, timeout: float | None = None) -> Event | None: ...

    @abstractmethod
    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = self.next()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class Store(ABC):
    url: str
    UPDATE_TRIES = 50          # update()'s compare-and-swap attempts before StoreConflict

    @abstractmethod
    def get(self, key: str) -> Entry | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Listing: ...

    @abstractmethod
    def put(self, key: str, value: Any, *, lease: Lease | int | None = None) -> int:
        """Set the key; returns the store's new revision."""

    @abstractmethod
    def cas(self, key: str, value: Any, *, revision: int,
            lease: Lease | int | None = None) -> bool:
        """Set the key only if its mod revision is `revision` (0: only if it is absent)."""

    @abstractmethod
    def delete(self, key: str, *, revision: int | None = None) -> bool:
        """Delete the key (only at that mod revision, when given); False if nothing was."""

    @abstractmethod
    def lease(self, ttl_s: float) -> Lease: ...

    @abstractmethod
    def watch(self, prefix: str = "", *, start_revision: int | None = None) -> Watch:
        """Changes under prefix from start_revision on (None: from now)."""

    @abstractmethod
    def revision(self) -> int: ...

    def close(self) -> None:
        pass

    def update(self, key: str, fn: Callable[[Any], Any], *, default: Any = None) -> Any:
        """Read the key, compute fn(value, or a copy of default when absent), write the
        result if nobody changed the key meanwhile, else try again (bounded): no lost
        update among concurrent writers. fn may run several times and may change its
        argument. Returns what was written; the key keeps its lease."""
        backoff = 0.001
        for _ in range(self.UPDATE_TRIES):
            entry = self.get(key)
            old = copy.deepcopy(default) if entry is None else entry.value
            new = fn(old)
            if self.cas(key, new, revision=0 if entry is None else entry.revision,
                        lease=None if entry is None else entry.lease):
                return new
            # Others won: back off a random while so racing writers spread out.
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, 0.05)
        raise StoreConflict(f"could not update {key} in the store {self.url}: other writers "
                            f"changed it first {self.UPDATE_TRIES} times in a row; try again")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_store(url: str = DEFAULT_STORE, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Store:
    """A path or file:PATH -> the file store; etcd://HOST:PORT -> etcd (timeout_s bounds
    every request to it)."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"a store is a path, file:PATH or etcd://HOST:PORT, not {url!r}")
    if url.startswith("etcd://"):
        try:
            from hyperplane.fleet.etcd import EtcdStore
        except ImportError as exc:
            raise EnvironmentProblem(f"the etcd store needs the Python package etcd3gw "
                                     f"({exc}): run scripts/setup.sh") from None
        return EtcdStore.from_url(url, timeout_s=timeout_s)
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigError(f"a file store URL is file:/PATH or file:///PATH, not {url!r}")
        return FileStore(parts.path)
    if "://" in url:
        raise ConfigError(f"unknown store {url!r}: use a path, file:PATH or etcd://HOST:PORT")
    return FileStore(url)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key or "\0" in key:
        raise ConfigError(f"a store key is a non-empty string without NUL, not {key!r}")
    return key


def encode_value(key: str, value: Any) -> str:
    """The value as compact JSON; a value JSON cannot hold is a ConfigError."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the value for {key} cannot be stored: it is not JSON ({exc})") \
            from None


def lease_id(lease: Lease | int | None) -> int | None:
    return lease.id if isinstance(lease, Lease) else lease


def check_ttl(ttl_s: float) -> float:
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0 \
            or math.isinf(ttl_s):
        raise ConfigError(f"a lease TTL is a positive number of seconds, not {ttl_s!r}")
    return float(ttl_s)


def check_start_revision(revision: int | None) -> int | None:
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)
                                 or revision < 1):
        raise ConfigError(f"a watch starts at revision 1 or later, not {revision!r}")
    return revision


# --- the file backend ------------------------------------------------------------------------
#
# One JSON file holds everything:
#   {"revision": R, "compact_revision": C, "next_lease": N, "boot_id": "...",
#    "keys": {key: {"value", "mod_revision", "create_revision", "lease"}},
#    "leases": {id: {"ttl_s", "expires"}},
#    "log": [{"revision", "type", "key", "value", "lease", "size"}, ...]}
# changed under an exclusive flock of PATH.lock and replaced by an atomic rename, so
# readers never see half a file and concurrent writers never lose each other's changes.
# Lease expiry times are CLOCK_MONOTONIC readings (time.monotonic): one clock for every
# process of the host, immune to wall-clock steps. It restarts at boot, so the file
# remembers the boot it was written in and a new boot expires every lease.
# A file has no history, so it keeps the last changes (the log, bounded in count and in
# bytes) for watch(start_revision) to replay; older revisions are compacted.

LOG_EVENTS = 1000              # changes kept for watchers to replay
LOG_BYTES = 1 << 20            # ...and at most this much of their values (JSON)
POLL_S = 0.05                  # how often a watch looks at the file


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()


class FileStore(Store):
    def __init__(self, path: str, *, log_events: int = LOG_EVENTS, log_bytes: int = LOG_BYTES,
                 poll_s: float = POLL_S):
        self.path = path
        self.url = f"file:{path}"
        self.log_events, self.log_bytes, self.poll_s = log_events, log_bytes, poll_s

    # --- the file, under its lock --------------------------------------------------------
    @contextmanager
    def _locked(self):
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            lock = open(self.path + ".lock", "a")
        except OSError as exc:
            raise StoreError(f"cannot use the store {self.path}: {exc.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        """The file's content; one that cannot be read or is not a store (empty, truncated,
        garbage, not UTF-8, not an object, fields of the wrong kind) is a StoreError."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return _FileState.empty()
        except OSError as exc:
            raise StoreError(f"cannot read the store {self.path}: {exc.strerror}") from None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            raise StoreError(f"the store {self.path} is not valid JSON ({exc}); fix or "
                             f"remove it") from None
        if not isinstance(data, dict):
            raise StoreError(f"the store {self.path} must hold a JSON object, not "
                             f"{type(data).__name__}; fix or remove it")
        problem = _FileState.problem(data)
        if problem:
            raise StoreError(f"the store {self.path} is not a hyperplane store file "
                             f"({problem}); fix or remove it")
        return data

    def _save(self, data: dict) -> None:
        # No fsync: the default store is on tmpfs (/run), and ext4 flushes a file replaced
        # by rename before the rename itself (auto_da_alloc).
        tmp = f"{self.path}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StoreError(f"cannot write the store {self.path}: {exc.strerror}") from None

    @contextmanager
    def _open(self):
        """The store's state under the lock, expired leases reaped; written back when it
        changed and the body ended without an exception."""
        with self._locked():
            state = _FileState(self._load(), self.log_events, self.log_bytes)
            state.reap(time.monotonic())
            yield state
            if state.dirty:
                self._save(state.data)

    def signature(self) -> tuple | None:
        """Changes whenever the file is replaced (every write renames a new inode in)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read the store {self.path}: {exc.strerror}") from None
        return st.st_ino, st.st_mtime_ns, st.st_size

    # --- the interface ---------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        check_key(key)
        with self._open() as state:
            return state.entry(key)

    def list(self, prefix: str = "") -> Listing:
        with self._open() as state:
            return Listing({k: state.entry(k) for k in sorted(state.keys)
                            if k.startswith(prefix)}, state.revision)

    def put(self, key: str, value: Any, *, lease: Lease | int | None = None) -> int:
        check_key(key)
        size = len(encode_value(key, value))
        with self._open() as state:
            self._check_lease(state, lease_id(lease))
            return state.put(key, value, lease_id(lease), size)

    def cas(self, key: str, value: Any, *, revision: int,
            lease: Lease | int | None = None) -> bool:
        check_key(key)
        size = len(encode_value(key, value))
        with self._open() as state:
            current = state.keys.get(key)
            if (current["mod_revision"] if current else 0) != revision:
                return False
            self._check_lease(state, lease_id(lease))
            state.put(key, value, lease_id(lease), size)
            return True

    def delete(self, key: str, *, revision: int | None = None) -> bool:
        check_key(key)
        with self._open() as state:
            current = state.keys.get(key)
            if current is None or (revision is not None and current["mod_revision"] != revision):
                return False
            state.delete([key])
            return True

    def lease(self, ttl_s: float) -> Lease:
        ttl_s = check_ttl(ttl_s)
        with self._open() as state:
            return _FileLease(self, state.grant(ttl_s, time.monotonic()), ttl_s)

    def watch(self, prefix: str = "", *, start_revision: int | None = None) -> Watch:
        return _FileWatch(self, prefix, check_start_revision(start_revision))

    def revision(self) -> int:
        with self._open() as state:
            return state.revision

    def _check_lease(self, state: "_FileState", lease: int | None) -> None:
        if lease is not None and str(lease) not in state.leases:
            raise LeaseExpired(f"lease {lease} of the store {self.path} has expired or was "
                               f"revoked: grant a new lease")


class _FileState:
    """The file store's content and the changes to it, in memory (no I/O here)."""

    def __init__(self, data: dict, log_events: int, log_bytes: int):
        self.data = data
        self.keys: dict[str, dict] = data["keys"]
        self.leases: dict[str, dict] = data["leases"]
        self.log: list[dict] = data["log"]
        self.log_events, self.log_bytes = log_events, log_bytes
        self.dirty = False

    @staticmethod
    def empty() -> dict:
        return {"revision": 0, "compact_revision": 0, "next_lease": 1, "boot_id": BOOT_ID,
                "keys": {}, "leases": {}, "log": []}

    @staticmethod
    def problem(data: dict) -> str | None:
        """What is wrong with a file's content, in a few words, or None: checked once here
        so that nothing later trips over a damaged file."""
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        for field in ("revision", "compact_revision", "next_lease"):
            if not whole(data.get(field)):
                return f"{field} must be a whole number"
        if not isinstance(data.get("boot_id"), str):
            return "boot_id must be a string"
        for field, kind in (("keys", dict), ("leases", dict), ("log", list)):
            if not isinstance(data.get(field), kind):
                return f"{field} must be a JSON {'object' if kind is dict else 'array'}"
        for key, item in data["keys"].items():
            if not isinstance(item, dict) or "value" not in item \
                    or not whole(item.get("mod_revision")) \
                    or not whole(item.get("create_revision")) \
                    or not (item.get("lease") is None or whole(item.get("lease"))):
                return f"key {key!r} needs value, mod_revision, create_revision and lease"
        for lid, item in data["leases"].items():
            if not lid.isdigit() or not isinstance(item, dict) \
                    or not number(item.get("ttl_s")) or not number(item.get("expires")):
                return f"lease {lid!r} needs ttl_s and expires"
        for item in data["log"]:
            if not isinstance(item, dict) or not whole(item.get("revision")) \
                    or item.get("type") not in ("put", "delete") \
                    or not isinstance(item.get("key"), str) or not whole(item.get("size")) \
                    or not (item.get("lease") is None or whole(item.get("lease"))):
                return "a log record needs revision, type, key, lease and size"
        return None

    @property
    def revision(self) -> int:
        return self.data["revision"]

    @property
    def compact_revision(self) -> int:
        return self.data["compact_revision"]

    def entry(self, key: str) -> Entry | None:
        item = self.keys.get(key)
        if item is None:
            return None
        return Entry(key, copy.deepcopy(item["value"]), item["mod_revision"], item["lease"])

    def next_expiry(self) -> float:
        return min((item["expires"] for item in self.leases.values()), default=math.inf)

    # --- changes: each bumps the revision once, logs its events and marks the state dirty
    def _bump(self) -> int:
        self.data["revision"] += 1
        self.data["boot_id"] = BOOT_ID
        self.dirty = True
        return self.data["revision"]

    def put(self, key: str, value: Any, lease: int | None, size: int) -> int:
        rev = self._bump()
        old = self.keys.get(key)
        self.keys[key] = {"value": value, "mod_revision": rev, "lease": lease,
                          "create_revision": old["create_revision"] if old else rev}
        self._log([{"revision": rev, "type": "put", "key": key, "value": value,
                    "lease": lease, "size": size}])
        return rev

    def delete(self, keys: list[str]) -> int:
        """Delete keys in one revision (as etcd does for a lease's keys)."""
        rev = self._bump()
        for key in keys:
            del self.keys[key]
        self._log([{"revision": rev, "type": "delete", "key": key, "value": None,
                    "lease": None, "size": 0} for key in keys])
        return rev

    def _log(self, events: list[dict]) -> None:
        self.log.extend(events)
        total = sum(e["size"] for e in self.log)
        while self.log and (len(self.log) > self.log_events or total > self.log_bytes):
            dropped = self.log.pop(0)
            total -= dropped["size"]
            self.data["compact_revision"] = max(self.compact_revision, dropped["revision"])
        # A revision is replayed whole or not at all.
        while self.log and self.log[0]["revision"] <= self.compact_revision:
            self.log.pop(0)

    def grant(self, ttl_s: float, now: float) -> int:
        lid = self.data["next_lease"]
        self.data["next_lease"] += 1
        self.leases[str(lid)] = {"ttl_s": ttl_s, "expires": now + ttl_s}
        self.data["boot_id"] = BOOT_ID
        self.dirty = True
        return lid

    def refresh(self, lid: int, now: float) -> bool:
        item = self.leases.get(str(lid))
        if item is None:
            return False
        item["expires"] = now + item["ttl_s"]
        self.dirty = True
        return True

    def revoke(self, lid: int) -> None:
        if self.leases.pop(str(lid), None) is not None:
            self.dirty = True
            keys = [k for k, item in self.keys.items() if item["lease"] == lid]
            if keys:
                self.delete(keys)

    def reap(self, now: float) -> None:
        """Revoke the leases that expired (all of them if the host rebooted since the file
        was written: their monotonic times are from another boot)."""
        rebooted = self.data["boot_id"] != BOOT_ID
        for lid, item in list(self.leases.items()):
            if rebooted or item["expires"] <= now:
                self.revoke(int(lid))
        if rebooted:
            self.data["boot_id"] = BOOT_ID
            self.dirty = True

    def events_since(self, revision: int, prefix: str) -> list[Event]:
        return [Event(e["type"], Entry(e["key"], copy.deepcopy(e["value"]), e["revision"],
                                       e["lease"]))
                for e in self.log if e["revision"] >= revision and e["key"].startswith(prefix)]


class _FileLease(Lease):
    def __init__(self, store: FileStore, lid: int, ttl_s: float):
        self.store, self.id, self.ttl_s = store, lid, ttl_s

    def refresh(self) -> None:
        with self.store._open() as state:
            alive = state.refresh(self.id, time.monotonic())
        if not alive:  # raised outside the lock's body, so the reaping above is written
            raise LeaseExpired(f"lease {self.id} of the store {self.store.path} expired before "
                               f"it was refreshed (its keys are gone): grant a new lease")

    def revoke(self) -> None:
        with self.store._open() as state:
            state.revoke(self.id)


class _FileWatch(Watch):
    """Polls the file: a stat every poll_s, a read (and reaping) only when the file was
    replaced or a lease is due to expire."""

    def __init__(self, store: FileStore, prefix: str, start_revision: int | None):
        self.store, self.prefix = store, prefix
        self.pending: deque[Event] = deque()
        self.cancelled = threading.Event()
        self.next_revision = start_revision
        self._read()

    def _read(self) -> None:
        signature = self.store.signature()  # before the read: a later change is seen next poll
        with self.store._open() as state:
            if self.next_revision is None:
                self.next_revision = state.revision + 1
            if self.next_revision <= state.compact_revision:
                raise WatchCompacted(
                    f"the store {self.store.path} no longer holds the changes from revision "
                    f"{self.next_revision} on (its log starts after {state.compact_revision}): "
                    f"read the keys again and watch from that read's revision + 1",
                    state.compact_revision)
            if state.revision < self.next_revision - 1:
                raise WatchCompacted(
                    f"the store {self.store.path} went back from revision "
                    f"{self.next_revision - 1} to {state.revision} (replaced or removed): "
                    f"read the keys again and watch from that read's revision + 1",
                    state.compact_revision)
            self.pending.extend(state.events_since(self.next_revision, self.prefix))
            self.next_revision = state.revision + 1
            self.lease_due = state.next_expiry()
        # When our own reaping rewrote the file, read it once more next poll rather than
        # take a stat after the write that might already include someone else's change.
        self.signature = None if state.dirty else signature

    def next(self, timeout: float | None = None) -> Event | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.cancelled.is_set():
            if not self.pending and (self.store.signature() != self.signature
                                     or time.monotonic() >= self.lease_due):
                self._read()
            if self.pending:
                return self.pending.popleft()
            wait = self.store.poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = min(wait, left)
            self.cancelled.wait(wait)
        return None

    def cancel(self) -> None:
        self.cancelled.set()
