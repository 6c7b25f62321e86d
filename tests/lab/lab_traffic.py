"""Traffic tools for the lab tests: servers and clients whose sockets live in lab
namespaces (created on a thread that setns'es, then driven from this process), plus a
tiny ICMP echo client. Every loop here is bounded in count and time."""
from __future__ import annotations

import os
import random
import resource
import selectors
import socket
import struct
import threading
import time

from hyperplane import netns


def raise_nofile(want: int = 16384) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_tcp(ns: str, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on host:port, probing from inside ns."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        s = netns.socket_in(ns)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
            return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
        finally:
            s.close()
    raise TimeoutError(f"nothing listens on {host}:{port} in {ns} after {timeout}s ({last})")


# --- UDP ---------------------------------------------------------------------------------

class _Server:
    """A server socket in a namespace, served by a thread while in a `with` block; it
    records every peer address it saw. Subclasses set self.sock and write _run()."""

    def __init__(self, sock: socket.socket, host: str, port: int):
        self.sock = sock
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.peers: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        self._close()

    def _close(self):
        self.sock.close()

    def _run(self):
        raise NotImplementedError


class UdpEcho(_Server):
    """A UDP echo server in a namespace that records every peer address it saw. `answer`
    makes the reply from the datagram (default: the datagram itself)."""

    def __init__(self, ns: str, host: str, port: int, *, echo: bool = True,
                 answer=lambda data: data):
        super().__init__(netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM), host, port)
        self.sock.settimeout(0.2)
        self.echo = echo
        self.answer = answer

    def _run(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer)
            if self.echo:
                self.sock.sendto(self.answer(data), peer)


def udp_exchange(sock: socket.socket, dst: tuple[str, int], n: int,
                 timeout: float = 1.0, size: int = 32) -> int:
    """n request/response rounds on one socket; returns how many answers came back."""
    sock.settimeout(timeout)
    ok = 0
    for i in range(n):
        msg = struct.pack("!I", i) + os.urandom(max(0, size - 4))
        sock.sendto(msg, dst)
        try:
            data, _ = sock.recvfrom(65535)
        except socket.timeout:
            continue
        ok += data == msg
    return ok


# --- TCP ---------------------------------------------------------------------------------

class TcpCollector(_Server):
    """A TCP server in a namespace that accepts connections, keeps them open and records
    each peer address (until stopped)."""

    def __init__(self, ns: str, host: str, port: int, backlog: int = 4096):
        super().__init__(netns.socket_in(ns), host, port)
        self.lsock = self.sock
        self.lsock.listen(backlog)
        self.lsock.setblocking(False)
        self.conns: list[socket.socket] = []

    def _close(self):
        for c in self.conns:
            c.close()
        self.lsock.close()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for _key, _ in sel.select(0.1):
                while True:
                    try:
                        c, peer = self.lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    self.conns.append(c)
                    self.peers.append(peer)
        sel.close()

    def wait_for(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while len(self.peers) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.peers)


def open_concurrent(ns: str, dst: tuple[str, int], n: int, timeout: float) -> tuple[list, int]:
    """Open n TCP connections from ns to dst at once (non-blocking connects, all kept open).
    Returns (sockets, how many connected within timeout). The caller closes the sockets."""
    socks = netns.sockets_in(ns, n)
    sel = selectors.DefaultSelector()
    pending = {}
    for s in socks:
        s.setblocking(False)
        err = s.connect_ex(dst)
        if err not in (0, 115):           # EINPROGRESS
            raise OSError(err, os.strerror(err))
        sel.register(s, selectors.EVENT_WRITE)
        pending[s.fileno()] = s
    connected = 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            sel.unregister(s)
            del pending[s.fileno()]
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    sel.close()
    return socks, connected


# --- ICMP --------------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(ns: str, dst: str, count: int = 3, timeout: float = 2.0) -> list[float]:
    """ICMP echo from inside ns (raw socket); returns the round-trip times (s) of the replies
    that came back, matched on identifier, sequence and payload."""
    s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = random.randint(1, 0xFFFF)
    rtts = []
    try:
        for seq in range(1, count + 1):
            payload = os.urandom(24)
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _csum(hdr + payload), ident, seq) + payload
            t0 = time.monotonic()
            s.sendto(pkt, (dst, 0))
            deadline = t0 + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    data, (src, _) = s.recvfrom(65535)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                icmp = data[ihl:]
                if len(icmp) < 8 or src != dst:
                    continue
                typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
                if typ == 0 and rid == ident and rseq == seq and icmp[8:] == payload:
                    if _csum(icmp) != 0:
                        raise AssertionError("ICMP echo reply with a bad checksum")
                    rtts.append(time.monotonic() - t0)
                    break
    finally:
        s.close()
    return rtts


# --- HTTP to the NLB ---------------------------------------------------------------------

class HttpResult:
    """One request's outcome: ok, the target's name, the peer it saw, its local port (from
    the lab target server's "<name> <ip>:<port> <local port>" body), or an error."""
    __slots__ = ("ok", "target", "peer_ip", "peer_port", "target_port", "src", "error")

    def __init__(self, ok, target=None, peer_ip=None, peer_port=None, target_port=None,
                 src=None, error=None):
        self.ok, self.target, self.peer_ip, self.peer_port = ok, target, peer_ip, peer_port
        self.target_port, self.src, self.error = target_port, src, error

    def __repr__(self):
        return (f"HttpResult({self.target}:{self.target_port} saw {self.peer_ip}:"
                f"{self.peer_port} from {self.src})" if self.ok else f"HttpResult({self.error})")


def _parse_answer(raw: bytes, src: str) -> HttpResult:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return HttpResult(False, src=src, error=f"bad answer {raw[:60]!r}")
    parts = body.decode("latin-1").split()
    if len(parts) != 3:
        return HttpResult(False, src=src, error=f"bad body {body[:60]!r}")
    ip, _, port = parts[1].rpartition(":")
    return HttpResult(True, parts[0], ip, int(port), int(parts[2]), src)


def http_get_many(ns: str, dst: tuple[str, int], n: int, *, sources: list[str],
                  concurrency: int = 32, timeout: float = 60.0,
                  per_request: float = 3.0) -> list[HttpResult]:
    """n HTTP GETs of "/" from ns to dst, each on a fresh TCP connection (Connection:
    close), `concurrency` at a time, source addresses taken in turn from `sources`. Bounded:
    n requests, `per_request` seconds each, `timeout` seconds in all."""
    import asyncio

    raise_nofile(n + 1024)
    socks = netns.sockets_in(ns, n)
    req = (f"GET / HTTP/1.1\r\nHost: {dst[0]}\r\nConnection: close\r\n\r\n").encode()
    results: list[HttpResult | None] = [None] * n

    async def one(i: int, sem: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        s, src = socks[i], sources[i % len(sources)]
        async with sem:
            try:
                s.setblocking(False)
                s.bind((src, 0))
                await asyncio.wait_for(loop.sock_connect(s, dst), per_request)
                await loop.sock_sendall(s, req)
                chunks = []
                while True:
                    data = await asyncio.wait_for(loop.sock_recv(s, 65536), per_request)
                    if not data:
                        break
                    chunks.append(data)
                results[i] = _parse_answer(b"".join(chunks), src)
            except (OSError, asyncio.TimeoutError) as exc:
                results[i] = HttpResult(False, src=src, error=f"{type(exc).__name__}: {exc}")
            finally:
                s.close()

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        await asyncio.wait_for(asyncio.gather(*(one(i, sem) for i in range(n))), timeout)

    try:
        asyncio.run(main())
    finally:
        for s in socks:
            s.close()
    return [r or HttpResult(False, error="not run (overall timeout)") for r in results]


class StreamDownload:
    """GET /stream?bytes=N&rate=R&seed=S from ns to dst on one connection, in a thread;
    hashes what arrives. `.target` is the X-Target header, `.received` the bytes so far."""

    def __init__(self, ns: str, dst: tuple[str, int], nbytes: int, rate: int, seed: int,
                 *, src: str, timeout: float):
        import hashlib
        self.sock = netns.socket_in(ns)
        self.sock.bind((src, 0))
        self.dst, self.nbytes, self.rate, self.seed = dst, nbytes, rate, seed
        self.timeout = timeout
        self.sha = hashlib.sha256()
        self.received = 0
        self.max_gap = 0.0        # the longest silence between two reads (a traffic gap)
        self.target: str | None = None
        self.error: str | None = None
        self.header = threading.Event()
        self.done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "StreamDownload":
        self._t.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            self.sock.settimeout(5)
            self.sock.connect(self.dst)
            self.sock.sendall(f"GET /stream?bytes={self.nbytes}&rate={self.rate}&seed="
                              f"{self.seed} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                              .encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the headers")
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"x-target":
                    self.target = v.strip().decode()
            self.header.set()
            self.sha.update(rest)
            self.received += len(rest)
            last = time.monotonic()
            while self.received < self.nbytes:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.received} of {self.nbytes} bytes after "
                                       f"{self.timeout}s")
                data = self.sock.recv(1 << 20)
                now = time.monotonic()
                self.max_gap, last = max(self.max_gap, now - last), now
                if not data:
                    break
                self.sha.update(data)
                self.received += len(data)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.header.set()
            self.sock.close()
            self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def wait_bytes(self, n: int, timeout: float = 30.0) -> None:
        """Wait until n bytes arrived; raises if the download ended or `timeout` passed
        first."""
        deadline = time.monotonic() + timeout
        while self.received < n:
            if self.done.is_set() or time.monotonic() > deadline:
                raise RuntimeError(f"the download from {self.dst} has {self.received} bytes, "
                                   f"not {n}: {self.error or f'still running after {timeout} s'}")
            time.sleep(0.02)

    def problem(self) -> str | None:
        """Why the ended download is not whole and byte-exact without an error (None: it
        is)."""
        from hyperplane.lab.servers import stream_sha256
        if self.error is not None:
            return f"the download broke: {self.error}"
        if self.received != self.nbytes:
            return f"{self.received} of {self.nbytes} bytes"
        if self.sha.hexdigest() != stream_sha256(self.seed, self.nbytes):
            return "the bytes differ"
        return None
