"""The lab's own servers, run inside its namespaces (`python -m hyperplane.lab serve`).
"""
from __future__ import annotations

import sys
import time

from hyperplane.lab.plan import TARGET_HTTP_PORTS, TARGET_UDP_PORT

# --- the targets' server -----------------------------------------------------------------
#
# One asyncio process per target (run inside the target's namespace):
#   HTTP/1.1 on TARGET_HTTP_PORTS (keep-alive unless "Connection: close" or HTTP/1.0):
#     GET /                       -> "<name> <peer ip>:<peer port> <local port>\n" (so a
#                                    client can tell which target and port answered and
#                                    what source address it saw)
#     GET /stream?bytes=N&rate=R&seed=S
#                                 -> N bytes of stream_chunks(S, N), at most R bytes/s
#                                    (R=0: unpaced); header X-Target: <name>
#   UDP on TARGET_UDP_PORT: answers "<name> <peer ip>:<peer port>|" + the datagram.

STREAM_CHUNK = 65536
SERVER_MAX_SECONDS = 3600.0     # a target server never outlives this


def stream_chunks(seed: int, nbytes: int, chunk: int = STREAM_CHUNK):
    """The deterministic body of /stream (the client recomputes it to check the bytes)."""
    import random
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def stream_sha256(seed: int, nbytes: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for c in stream_chunks(seed, nbytes):
        h.update(c)
    return h.hexdigest()


def target_server_argv(name: str, ip: str, *, http_ports=TARGET_HTTP_PORTS,
                       udp_port: int | None = TARGET_UDP_PORT,
                       seconds: float = SERVER_MAX_SECONDS) -> list[str]:
    argv = [sys.executable, "-m", "hyperplane.lab", "serve", "--name", name, "--ip", ip,
            "--http-ports", ",".join(map(str, http_ports)), "--seconds", str(seconds)]
    if udp_port:
        argv += ["--udp-port", str(udp_port)]
    return argv


def _serve(name: str, ip: str, http_ports: list[int], udp_port: int | None,
           seconds: float) -> None:
    import asyncio
    from urllib.parse import parse_qs

    async def stream(writer, nbytes: int, rate: float, seed: int) -> None:
        t0 = time.monotonic()
        sent = 0
        for chunk in stream_chunks(seed, nbytes):
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    async def handle(reader, writer) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                headers = []
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    headers.append(h.lower())
                parts = line.split()
                if len(parts) != 3:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    break
                _method, target, version = parts
                keep = version == b"HTTP/1.1" and not any(
                    h.startswith(b"connection:") and b"close" in h for h in headers)
                conn = b"keep-alive" if keep else b"close"
                path, _, query = target.decode("latin-1").partition("?")
                if path == "/stream":
                    q = {k: v[-1] for k, v in parse_qs(query).items()}
                    nbytes = min(int(q.get("bytes", 1 << 20)), 1 << 34)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream"
                                 b"\r\nX-Target: " + name.encode() + b"\r\nContent-Length: "
                                 + str(nbytes).encode() + b"\r\nConnection: " + conn
                                 + b"\r\n\r\n")
                    await stream(writer, nbytes, float(q.get("rate", 0)),
                                 int(q.get("seed", 0)))
                else:
                    local = writer.get_extra_info("sockname") or ("?", 0)
                    body = f"{name} {peer[0]}:{peer[1]} {local[1]}\n".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Target: "
                                 + name.encode() + b"\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\nConnection: " + conn
                                 + b"\r\n\r\n" + body)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(f"{name} {addr[0]}:{addr[1]}|".encode() + data, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await asyncio.start_server(handle, ip, port, reuse_address=True,
                                              backlog=4096) for port in http_ports]
        if udp_port:
            await loop.create_datagram_endpoint(Udp, local_addr=(ip, udp_port))
        print("ready", flush=True)
        try:
            await asyncio.sleep(seconds)
        finally:
            for s in servers:
                s.close()

    asyncio.run(main())


def _main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hyperplane.lab",
                                 description="Lab helpers run inside lab namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="a target's HTTP + UDP server (see hyperplane/lab/)")
    sv.add_argument("--name", required=True)
    sv.add_argument("--ip", default="0.0.0.0")
    sv.add_argument("--http-ports", default=",".join(map(str, TARGET_HTTP_PORTS)))
    sv.add_argument("--udp-port", type=int, default=None)
    sv.add_argument("--seconds", type=float, default=SERVER_MAX_SECONDS)
    args = ap.parse_args(argv)
    ports = [int(p) for p in args.http_ports.split(",") if p]
    try:
        _serve(args.name, args.ip, ports, args.udp_port, min(args.seconds, SERVER_MAX_SECONDS))
    except KeyboardInterrupt:
        pass
    return 0
