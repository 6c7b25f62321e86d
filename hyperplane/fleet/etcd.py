"""The etcd backend of the cluster store (the interface is hyperplane.fleet.store.Store).

For a cluster of hosts: Debian's etcd-server (3.4) spoken to through its JSON gateway
(/v3/..., base64 keys and values, int64 numbers as strings, fields that are zero left out)
with the etcd3gw client, which needs no protobuf (the `etcd3` package's generated code no
longer imports with current protobuf). etcd3gw's own helpers drop what the store needs
(put and range answer no revision, a lease grant no TTL, and its watch ignores compaction
and stream errors), so requests go through etcd3gw's `Etcd3Client.post` (session,
timeouts, HTTP errors as exceptions) with the gateway's own request bodies, and a watch
is one streaming HTTP request read with http.client (its socket can be shut down to
cancel it from another thread).

  compare-and-swap   a transaction comparing the key's mod_revision (revision 0: its
                     create_revision is 0, i.e. the key is absent)
  leases             etcd leases: TTLs are whole seconds and etcd raises a short one to
                     its minimum, ceil(1.5 x election timeout): 2 s with the default
                     --election-timeout 1000; 1 s (the least there is) with e.g.
                     --heartbeat-interval 50 --election-timeout 500. Lease.ttl_s says
                     what etcd granted. Expired leases are revoked by etcd's leader,
                     which looks every 500 ms: keys go up to ~0.5 s after the TTL.
  watch              etcd's watch from a revision; history that etcd compacted raises
                     WatchCompacted.
  errors             connection refused, timeouts (every request, and the start of a
                     watch, is bounded by timeout_s) and refusals are StoreError.
"""
from __future__ import annotations

import base64
import http.client
import json
import math
import queue
import socket
import threading
import weakref
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors

from hyperplane.errors import ConfigError, StoreError
from hyperplane.fleet.store import (DEFAULT_TIMEOUT_S, Entry, Event, Lease, LeaseExpired,
                                    Listing, Store, Watch, WatchCompacted, check_key,
                                    check_start_revision, check_ttl, encode_value, lease_id)

API = "/v3/"                # the JSON gateway's path in etcd 3.4 and later
DEFAULT_PORT = 2379


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key starting with prefix ("": every key)."""
    if not prefix:
        return b"\0", b"\0"
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return prefix.encode(), b"\0"
    raw[-1] += 1
    return prefix.encode(), bytes(raw)


class EtcdStore(Store):
    def __init__(self, host: str, port: int = DEFAULT_PORT, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.url = f"etcd://{host}:{port}"
        # requests sessions are not meant to be shared between threads: one per thread.
        self._local = threading.local()
        self._clients: list[etcd3gw.Etcd3Client] = []
        self._clients_lock = threading.Lock()
        self._watches: weakref.WeakSet[_EtcdWatch] = weakref.WeakSet()

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> "EtcdStore":
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port or DEFAULT_PORT
            extra = parts.path not in ("", "/") or parts.query or parts.username
        except ValueError:  # a port that is no number, a broken [IPv6] address
            host, extra = None, True
        if not host or extra:
            raise ConfigError(f"an etcd store URL is etcd://HOST:PORT, not {url!r}")
        return cls(host, port, timeout_s=timeout_s)

    # --- requests ------------------------------------------------------------------------
    def _client(self) -> etcd3gw.Etcd3Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = etcd3gw.Etcd3Client(host=self.host, port=self.port, timeout=self.timeout_s,
                                         api_path=API)
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _post(self, path: str, payload: dict, what: str) -> dict:
        """POST to the gateway; every failure is a StoreError saying what failed."""
        client = self._client()
        try:
            answer = client.post(client.get_url(path), json=payload)
        except etcd_errors.ConnectionTimeoutError:
            raise StoreError(f"the etcd store at {self.url} did not answer within "
                             f"{self.timeout_s:g} s ({what})") from None
        except etcd_errors.ConnectionFailedError as exc:
            # etcd3gw raises this for a refused connection (no args beyond the text) and
            # for an HTTP 503 answer (with its reason phrase): etcd there, but not serving.
            if exc.args:
                raise StoreError(f"the etcd store at {self.url} is unavailable ({what}): "
                                 f"{_etcd_message(exc.detail_text)}") from None
            raise StoreError(f"cannot connect to the etcd store at {self.url} ({what}): is "
                             f"etcd running and listening there?") from None
        except etcd_errors.Etcd3Exception as exc:
            message = _etcd_message(exc.detail_text)
            if "lease not found" in message:
                raise LeaseExpired(f"the lease is gone from the etcd store at {self.url} "
                                   f"({what}): it expired or was revoked; grant a new "
                                   f"lease") from None
            raise StoreError(f"the etcd store at {self.url} refused {what}: {message}") \
                from None
        except requests.exceptions.JSONDecodeError:
            raise StoreError(f"{self.url} did not answer like etcd's JSON gateway ({what}): "
                             f"is it etcd 3.4 or newer?") from None
        except requests.RequestException as exc:
            raise StoreError(f"talking to the etcd store at {self.url} failed ({what}): "
                             f"{type(exc).__name__}") from None
        if not isinstance(answer, dict):
            raise StoreError(f"{self.url} did not answer like etcd's JSON gateway ({what})")
        return answer

    def _entry(self, kv: dict) -> Entry:
        key = _unb64(kv["key"]).decode("utf-8", "replace")
        try:
            value = json.loads(_unb64(kv.get("value", "")).decode("utf-8"))
        except ValueError as exc:
            raise StoreError(f"the key {key} in the etcd store at {self.url} does not hold "
                             f"JSON ({exc}); fix or delete it") from None
        lease = int(kv.get("lease", 0))
        return Entry(key, value, int(kv.get("mod_revision", 0)), lease or None)

    # --- the interface ---------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        answer = self._post("kv/range", {"key": _b64(check_key(key))}, f"reading {key}")
        kvs = answer.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    def list(self, prefix: str = "") -> Listing:
        start, end = _prefix_range(prefix)
        answer = self._post("kv/range", {"key": _b64(start), "range_end": _b64(end)},
                            f"listing {prefix or 'every key'}")
        entries = [self._entry(kv) for kv in answer.get("kvs") or []]
        return Listing({e.key: e for e in entries}, _header_revision(answer))

    def put(self, key: str, value: Any, *, lease: Lease | int | None = None) -> int:
        body = {"key": _b64(check_key(key)), "value": _b64(encode_value(key, value))}
        if lease_id(lease) is not None:
            body["lease"] = lease_id(lease)
        return _header_revision(self._post("kv/put", body, f"writing {key}"))

    def cas(self, key: str, value: Any, *, revision: int,
            lease: Lease | int | None = None) -> bool:
        put = {"key": _b64(check_key(key)), "value": _b64(encode_value(key, value))}
        if lease_id(lease) is not None:
            put["lease"] = lease_id(lease)
        answer = self._post("kv/txn", {"compare": [_compare(key, revision)],
                                       "success": [{"request_put": put}]},
                            f"writing {key} at revision {revision}")
        return bool(answer.get("succeeded"))

    def delete(self, key: str, *, revision: int | None = None) -> bool:
        check_key(key)
        if revision is None:
            answer = self._post("kv/deleterange", {"key": _b64(key)}, f"deleting {key}")
            return int(answer.get("deleted", 0)) > 0
        answer = self._post("kv/txn", {"compare": [_compare(key, revision)],
                                       "success": [{"request_delete_range": {"key": _b64(key)}}]},
                            f"deleting {key} at revision {revision}")
        if not answer.get("succeeded"):
            return False
        deleted = (answer.get("responses") or [{}])[0].get("response_delete_range", {})
        return int(deleted.get("deleted", 0)) > 0

    def lease(self, ttl_s: float) -> Lease:
        ttl_s = check_ttl(ttl_s)
        answer = self._post("lease/grant", {"TTL": math.ceil(ttl_s), "ID": 0},
                            f"granting a {ttl_s:g} s lease")
        if answer.get("error") or not int(answer.get("ID", 0)):
            raise StoreError(f"the etcd store at {self.url} granted no lease: "
                             f"{answer.get('error') or 'no lease id in its answer'}")
        return _EtcdLease(self, int(answer["ID"]), float(answer.get("TTL", math.ceil(ttl_s))))

    def watch(self, prefix: str = "", *, start_revision: int | None = None) -> Watch:
        watch = _EtcdWatch(self, prefix, check_start_revision(start_revision))
        self._watches.add(watch)
        return watch

    def revision(self) -> int:
        # Any read answers with the store's revision: read one key nobody uses.
        return _header_revision(self._post("kv/range", {"key": _b64(b"\0"), "count_only": True},
                                           "reading the revision"))

    def compact(self, revision: int) -> None:
        """Drop the history before revision (watches from earlier raise WatchCompacted)."""
        self._post("kv/compaction", {"revision": revision, "physical": True},
                   f"compacting to revision {revision}")

    def close(self) -> None:
        for watch in list(self._watches):
            watch.cancel()
        with self._clients_lock:
            for client in self._clients:
                client.session.close()
            self._clients.clear()


def _compare(key: str, revision: int) -> dict:
    if revision == 0:  # absent: never created (or deleted since)
        return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": revision}


def _header_revision(answer: dict) -> int:
    return int((answer.get("header") or {}).get("revision", 0))


def _etcd_message(detail: str | None) -> str:
    """etcd's own words from an error answer ({"error", "message", "code"})."""
    try:
        data = json.loads(detail or "")
        return str(data.get("message") or data.get("error") or detail)
    except (ValueError, AttributeError):
        return (detail or "no details").strip()[:200]


class _EtcdLease(Lease):
    def __init__(self, store: EtcdStore, lid: int, ttl_s: float):
        self.store, self.id, self.ttl_s = store, lid, ttl_s

    def refresh(self) -> None:
        answer = self.store._post("lease/keepalive", {"ID": self.id},
                                  f"refreshing lease {self.id}")
        # An expired lease is answered with no TTL (zero), not with an error.
        if int((answer.get("result") or {}).get("TTL", 0)) <= 0:
            raise LeaseExpired(f"lease {self.id} of the etcd store at {self.store.url} "
                               f"expired before it was refreshed (its keys are gone): grant a "
                               f"new lease")

    def revoke(self) -> None:
        try:
            self.store._post("lease/revoke", {"ID": self.id}, f"revoking lease {self.id}")
        except LeaseExpired:
            pass


class _EtcdWatch(Watch):
    """One streaming POST /v3/watch; a thread turns its lines (one JSON answer each) into
    events on a queue, and a failure or a cancellation by etcd into an exception there."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int | None):
        self.store = store
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.failure: StoreError | None = None
        self.sock: socket.socket | None = None
        start, end = _prefix_range(prefix)
        create = {"key": _b64(start), "range_end": _b64(end)}
        if start_revision is not None:
            create["start_revision"] = start_revision
        self.conn = http.client.HTTPConnection(store.host, store.port, timeout=store.timeout_s)
        try:
            self.conn.request("POST", API + "watch", json.dumps({"create_request": create}),
                              {"Content-Type": "application/json"})
            self.sock = self.conn.sock
            self.response = self.conn.getresponse()
            if self.response.status != 200:
                detail = self.response.read(2000).decode("utf-8", "replace")
                raise StoreError(f"the etcd store at {store.url} refused a watch: "
                                 f"{_etcd_message(detail)}")
            created = self._answer()
        except socket.timeout:
            self.conn.close()
            raise StoreError(f"the etcd store at {store.url} did not answer within "
                             f"{store.timeout_s:g} s (starting a watch)") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.conn.close()
            raise StoreError(f"cannot watch the etcd store at {store.url}: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}; is etcd "
                             f"running and listening there?") from None
        except StoreError:
            self.conn.close()
            raise
        if not created or not created.get("created"):
            self.conn.close()
            raise StoreError(f"the etcd store at {store.url} did not start a watch: {created}")
        self.sock.settimeout(None)  # from now on a quiet stream only means nothing changed
        threading.Thread(target=self._read, name=f"watch {store.url}{prefix}",
                         daemon=True).start()

    def _answer(self) -> dict | None:
        """The next answer on the stream ({"result": ...} unwrapped); None at its end."""
        while True:
            line = self.response.readline()
            if not line:
                return None
            if line.strip():
                break
        message = json.loads(line)
        if "error" in message:
            error = message["error"]
            raise StoreError(f"the watch on the etcd store at {self.store.url} ended ("
                             f"{error.get('message') if isinstance(error, dict) else error}): "
                             f"watch again from the revision after the last event seen")
        return message.get("result") or {}

    def _read(self) -> None:
        try:
            while True:
                result = self._answer()
                if result is None:
                    raise StoreError(f"the watch on the etcd store at {self.store.url} ended "
                                     f"(etcd stopped or the connection broke): watch again "
                                     f"from the revision after the last event seen")
                if result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        raise WatchCompacted(
                            f"the etcd store at {self.store.url} compacted its history up "
                            f"to revision {compacted}: read the keys again and watch from "
                            f"that read's revision + 1", compacted)
                    raise StoreError(f"the etcd store at {self.store.url} cancelled a watch: "
                                     f"{result.get('cancel_reason') or 'no reason given'}")
                for event in result.get("events") or []:
                    kv = event.get("kv") or {}
                    if event.get("type") == "DELETE":
                        entry = Entry(_unb64(kv["key"]).decode("utf-8", "replace"), None,
                                      int(kv.get("mod_revision", 0)))
                        self.events.put(Event("delete", entry))
                    else:
                        self.events.put(Event("put", self.store._entry(kv)))
        except StoreError as exc:
            if not self.cancelled.is_set():
                self.events.put(exc)
        except Exception as exc:  # a broken stream (socket, chunking, JSON)
            if not self.cancelled.is_set():
                self.events.put(StoreError(
                    f"the watch on the etcd store at {self.store.url} broke "
                    f"({type(exc).__name__}): watch again from the revision after the last "
                    f"event seen"))

    def next(self, timeout: float | None = None) -> Event | None:
        if self.failure is not None:
            raise self.failure
        if self.cancelled.is_set():
            return None
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:       # cancel() woke us
            return None
        if isinstance(item, StoreError):
            self.failure = item
            raise item
        return item

    def cancel(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        self.events.put(None)
        try:  # wakes the reading thread out of its blocking read
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
