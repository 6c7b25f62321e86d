"""Flow events for followers (hpctl flows --follow): the agent republishes the events its
EventHub reads on a unix socket, one JSON object a line; a follower connects and reads.
The CLI never reads the BPF ring itself (a ring has one consumer: the agent).

A follower that does not keep up (its socket buffer full) is dropped rather than slowing
the agent; events that arrive while the queue is full (no thread free to send them) are
counted as lost."""
from __future__ import annotations

import collections
import json
import logging
import os
import select
import socket
import threading
import time

from hyperplane.codec import PROTOCOL_NAMES

log = logging.getLogger("hyperplane.observe.follow")

QUEUE_MAX = 100_000


def events_socket_path(node: str) -> str:
    """The unix socket the node's agent republishes flow events on."""
    from hyperplane.node.lifecycle import state_path
    return state_path(node, ".events.sock")


def event_dict(ev, wall_offset_ns: int) -> dict:
    """A FlowEvent (hyperplane.observe.events) as the JSON a follower gets."""
    r = ev.record
    return {"event": ev.type.name.removeprefix("FLOW_").lower(),
            "time": round((ev.ts_ns + wall_offset_ns) / 1e9, 3),
            "kind": getattr(r.kind, "name", str(r.kind)),
            "proto": PROTOCOL_NAMES.get(r.proto, str(r.proto)),
            "src": r.src, "sport": r.sport, "dst": r.dst, "dport": r.dport,
            "new_src": r.new_src, "new_sport": r.new_sport, "new_dst": r.new_dst,
            "new_dport": r.new_dport,
            "tcp_state": getattr(r.tcp_state, "name", str(r.tcp_state)),
            "resource": r.resource, "confirmed": r.confirmed,
            "packets": ev.packets, "bytes": ev.bytes, "reply_direction": ev.reply,
            "twin_packets": ev.twin_packets, "twin_bytes": ev.twin_bytes,
            "verdict": _verdict_name(ev.verdict)}


def _verdict_name(verdict: int | None) -> str | None:
    """A rejected packet's verdict (DROP_NO_FLOW, ...); None for flow events."""
    if verdict is None:
        return None
    from hyperplane.datapath.verdicts import Verdict
    try:
        return Verdict(verdict).name
    except ValueError:
        return str(verdict)


class EventPublisher:
    """A unix stream socket at path; every event of the hub goes to every connected
    follower as a JSON line."""

    def __init__(self, path: str, hub):
        self.path = path
        self._queue: collections.deque = collections.deque()
        self.counts = {"followers": 0, "sent": 0, "lost": 0, "dropped_followers": 0}
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        os.chmod(path, 0o600)
        self._server.listen(16)
        self._server.setblocking(False)
        self._clients: list[socket.socket] = []
        self.stop = threading.Event()
        self._hub = hub     # subscribed while a follower is connected: idle, it costs nothing
        self._thread = threading.Thread(target=self._run, name="follow", daemon=True)
        self._thread.start()

    def _on_event(self, raw: bytes) -> None:
        if not self._clients:
            return                    # nobody follows: nothing to decode
        if len(self._queue) >= QUEUE_MAX:
            self.counts["lost"] += 1
            return
        self._queue.append(raw)

    def _run(self) -> None:
        from hyperplane.datapath.flows import now_ns
        from hyperplane.observe.events import decode
        poller = select.poll()       # not select(): the agent's fds may be >= FD_SETSIZE
        poller.register(self._server, select.POLLIN)
        while not self.stop.is_set():
            if poller.poll(50):
                self._accept()
            if not self._queue:
                continue
            offset = time.time_ns() - now_ns()
            lines = []
            while self._queue:
                try:
                    lines.append(json.dumps(event_dict(decode(self._queue.popleft()), offset)))
                except ValueError:        # an event of another version
                    self.counts["lost"] += 1
            data = ("\n".join(lines) + "\n").encode()
            for c in list(self._clients):
                try:
                    self._send_nowait(c, data)
                    self.counts["sent"] += len(lines)
                except OSError:
                    self._drop(c)

    @staticmethod
    def _send_nowait(c: socket.socket, data: bytes) -> None:
        sent = c.send(data)
        if sent < len(data):
            raise BlockingIOError("the follower does not keep up")

    def _accept(self) -> None:
        try:
            c, _ = self._server.accept()
        except BlockingIOError:
            return
        c.setblocking(False)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        if not self._clients:
            self._hub.subscribe_events(self._on_event)
        self._clients.append(c)
        self.counts["followers"] = len(self._clients)

    def _drop(self, c: socket.socket) -> None:
        self._clients.remove(c)
        c.close()
        self.counts["dropped_followers"] += 1
        self.counts["followers"] = len(self._clients)
        if not self._clients:
            self._hub.unsubscribe_events(self._on_event)

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=5)
        for c in self._clients:
            c.close()
        self._server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
