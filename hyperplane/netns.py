"""Network namespace plumbing for the lab, through pyroute2's explicit verbs.

Everything here acts *inside* a named network namespace: links are created in the
namespace they belong to (a veth pair is made in one lab namespace and its peer is moved
into another), so nothing is ever created in, or connected to, the root namespace.

Processes are started in a namespace with ``subprocess`` and a ``preexec_fn`` that calls
setns(2) on the namespace; unlike ``ip netns exec`` this does not remount ``/sys``, so a
bpffs pinned elsewhere stays visible. In-process work that must happen inside a namespace
(sysctl writes, sockets) runs on a short-lived thread that setns'es: setns(CLONE_NEWNET)
only moves the calling thread.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from hyperplane.errors import EnvironmentProblem, HyperplaneError, NotFound

NETNS_RUN_DIR = "/var/run/netns"


# --- namespaces -------------------------------------------------------------------------

def exists(name: str) -> bool:
    return name in list_namespaces()


def list_namespaces() -> list[str]:
    from pyroute2 import netns as _pnetns
    try:
        return sorted(_pnetns.listnetns())
    except FileNotFoundError:
        return []


def create(name: str) -> bool:
    """Create the named namespace; True if it was created, False if it already existed."""
    from pyroute2 import netns as _pnetns
    if exists(name):
        return False
    _pnetns.create(name)
    return True


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is the named one."""
    try:
        st = os.stat(os.path.join(NETNS_RUN_DIR, name))
    except FileNotFoundError:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            out.append(int(entry))
    return out


def kill_processes(name: str, timeout: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process living in the named namespace (a lab namespace
    only holds what the lab started). Returns the pids found."""
    pids = pids_in(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pids_in(name):
        time.sleep(0.05)
    for pid in pids_in(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove(name: str, kill: bool = True) -> bool:
    """Delete the named namespace (idempotent); True if it existed. Its processes are killed
    first so the namespace (and its veths) really goes away."""
    from pyroute2 import netns as _pnetns
    if not exists(name):
        return False
    if kill:
        kill_processes(name)
    _pnetns.remove(name)
    return True


@contextlib.contextmanager
def ipr(ns: str) -> Iterator[IPRoute]:
    """An IPRoute socket inside the namespace (which must exist: never created here)."""
    from pyroute2 import IPRoute
    if not exists(ns):
        raise NotFound(f"network namespace {ns!r} does not exist")
    with IPRoute(netns=ns, flags=0) as ip:
        yield ip


def _index(ip: IPRoute, ifname: str) -> int:
    idx = ip.link_lookup(ifname=ifname)
    if not idx:
        raise NotFound(f"no interface {ifname!r} in namespace {ip.status.get('netns')!r}")
    return idx[0]


# --- links, addresses, routes, neighbours -----------------------------------------------

def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, *, mac_a: str | None = None,
         mac_b: str | None = None, mtu: int | None = None) -> None:
    """A veth pair: if_a in ns_a, if_b in ns_b; both brought up."""
    with ipr(ns_a) as ip:
        ip.link("add", ifname=if_a, kind="veth", peer=if_b)
        peer = _index(ip, if_b)
        ip.link("set", index=peer, net_ns_fd=os.path.join(NETNS_RUN_DIR, ns_b))
        a = _index(ip, if_a)
        kw: dict[str, Any] = {}
        if mac_a:
            kw["address"] = mac_a
        if mtu:
            kw["mtu"] = mtu
        if kw:
            ip.link("set", index=a, **kw)
    with ipr(ns_b) as ip:
        kw = {}
        if mac_b:
            kw["address"] = mac_b
        if mtu:
            kw["mtu"] = mtu
        if kw:
            ip.link("set", index=_index(ip, if_b), **kw)
    set_up(ns_a, if_a)
    set_up(ns_b, if_b)


def bridge(ns: str, ifname: str, *, mac: str | None = None, mtu: int | None = None) -> None:
    """A Linux bridge in the namespace (no STP: its ports forward at once), brought up."""
    with ipr(ns) as ip:
        ip.link("add", ifname=ifname, kind="bridge")
        kw: dict[str, Any] = {}
        if mac:
            kw["address"] = mac
        if mtu:
            kw["mtu"] = mtu
        if kw:
            ip.link("set", index=_index(ip, ifname), **kw)
    set_up(ns, ifname)


def set_master(ns: str, ifname: str, master: str) -> None:
    """Make ifname a port of the bridge `master` (both in the namespace)."""
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), master=_index(ip, master))


def delete_link(ns: str, ifname: str) -> bool:
    """Delete an interface (a veth takes its peer with it); True if it existed."""
    with ipr(ns) as ip:
        idx = ip.link_lookup(ifname=ifname)
        if not idx:
            return False
        ip.link("del", index=idx[0])
        return True


def set_up(ns: str, ifname: str) -> None:
    with ipr(ns) as ip:
        ip.link("set", index=_index(ip, ifname), state="up")


def add_address(ns: str, ifname: str, cidr: str) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    addr, _, plen = cidr.partition("/")
    with ipr(ns) as ip:
        try:
            ip.addr("add", index=_index(ip, ifname), address=addr, prefixlen=int(plen or 32))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def add_route(ns: str, dst: str, gateway: str | None = None, ifname: str | None = None) -> None:
    """dst is a CIDR or 'default'."""
    from pyroute2.netlink.exceptions import NetlinkError
    with ipr(ns) as ip:
        kw: dict[str, Any] = {"dst": "0.0.0.0/0" if dst == "default" else dst}
        if gateway:
            kw["gateway"] = gateway
        if ifname:
            kw["oif"] = _index(ip, ifname)
        try:
            ip.route("add", **kw)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def add_neighbour(ns: str, ifname: str, ip_addr: str, mac: str) -> None:
    """A permanent neighbour entry (bpf_fib_lookup needs a resolved neighbour)."""
    with ipr(ns) as ip:
        ip.neigh("replace", dst=ip_addr, lladdr=mac, ifindex=_index(ip, ifname),
                 state="permanent")


def links(ns: str) -> list[dict]:
    """Interfaces of a namespace: name, index, MAC, state, MTU, IPv4 addresses, XDP,
    rx/tx packet counts."""
    out = []
    with ipr(ns) as ip:
        addrs: dict[int, list[str]] = {}
        for a in ip.get_addr(family=socket.AF_INET):
            addrs.setdefault(a["index"], []).append(
                f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        for link in ip.get_links():
            idx = link["index"]
            xdp = link.get_attr("IFLA_XDP")
            xdp_info = None
            if xdp is not None:
                attached = xdp.get_attr("IFLA_XDP_ATTACHED")
                if attached and attached not in (0, "none"):
                    xdp_info = {"mode": {1: "native", 2: "generic", 3: "offload", 4: "multi",
                                         "xdp": "native", "xdpgeneric": "generic",
                                         "xdpoffload": "offload", "xdpmulti": "multi"}
                                .get(attached, str(attached)),
                                "prog_id": xdp.get_attr("IFLA_XDP_PROG_ID")}
            stats = link.get_attr("IFLA_STATS64") or {}
            tc = _tc_ingress_programs(ip, idx)
            out.append({
                "ifname": link.get_attr("IFLA_IFNAME"),
                "index": idx,
                "mac": link.get_attr("IFLA_ADDRESS"),
                "state": link.get_attr("IFLA_OPERSTATE"),
                "mtu": link.get_attr("IFLA_MTU"),
                "addresses": addrs.get(idx, []),
                "xdp": xdp_info,
                "tc": tc,
                "rx_packets": stats.get("rx_packets"),
                "tx_packets": stats.get("tx_packets"),
            })
    return out


def _tc_ingress_programs(ip, index: int) -> list[str]:
    """Names of the BPF programs attached to an interface's tc (clsact) ingress hook."""
    try:
        filters = ip.get_filters(index=index, parent=0xFFFFFFF2)
    except Exception:  # no clsact qdisc: nothing attached
        return []
    names = []
    for f in filters:
        if f.get_attr("TCA_KIND") != "bpf":
            continue
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        if name:
            names.append(name.split(":")[0])
    return names


def rx_packets(ns: str, ifnames: Sequence[str]) -> dict[str, int]:
    """Packets received so far on each of ifnames in the namespace."""
    got = {l["ifname"]: l["rx_packets"] for l in links(ns)}
    return {i: got[i] for i in ifnames}


def neighbours(ns: str) -> list[dict]:
    with ipr(ns) as ip:
        return [{"dst": n.get_attr("NDA_DST"), "mac": n.get_attr("NDA_LLADDR"),
                 "index": n["ifindex"], "state": n["state"]}
                for n in ip.get_neighbours(family=socket.AF_INET)]


# --- running things inside a namespace ---------------------------------------------------

def _ns_fd(ns: str) -> int:
    try:
        return os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {ns!r} does not exist") from None


def call_in(ns: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run fn(*args, **kwargs) on a fresh thread that has entered the namespace; return its
    result (or raise its exception). Sockets created there stay in that namespace."""
    from pyroute2 import netns as _pnetns
    fd = _ns_fd(ns)
    box: dict[str, Any] = {}

    def body():
        try:
            _pnetns.setns(fd, flags=0)
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed back to the caller
            box["error"] = exc

    try:
        t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def socket_in(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket that lives in the namespace (usable from any thread afterwards)."""
    return call_in(ns, socket.socket, family, type, proto)


def sockets_in(ns: str, n: int, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> list[socket.socket]:
    """n sockets created in the namespace in one go."""
    return call_in(ns, lambda: [socket.socket(family, type) for _ in range(n)])


def sysctl(ns: str, key: str, value: Any) -> None:
    """Write a sysctl (dotted or slashed key) as seen from inside the namespace."""
    path = "/proc/sys/" + key.replace(".", "/") if "/" not in key else "/proc/sys/" + key

    def write():
        with open(path, "w") as f:
            f.write(str(value))

    call_in(ns, write)


def read_sysctl(ns: str, key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")

    def read():
        with open(path) as f:
            return f.read().strip()

    return call_in(ns, read)


def _preexec(fd: int, extra: Callable[[], None] | None = None) -> Callable[[], None]:
    from pyroute2 import netns as _pnetns
    def enter():
        _pnetns.setns(fd, flags=0)
        if extra:
            extra()
    return enter


def popen_in(ns: str, argv: Sequence[str], *, preexec: Callable[[], None] | None = None,
             **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen of argv inside the namespace (setns in the child, no /sys remount)."""
    fd = _ns_fd(ns)
    try:
        return subprocess.Popen(list(argv), preexec_fn=_preexec(fd, preexec), **kwargs)
    finally:
        os.close(fd)


def run_in(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float | None = 60,
           preexec: Callable[[], None] | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run of argv inside the namespace; check=True raises on a non-zero exit."""
    fd = _ns_fd(ns)
    try:
        return subprocess.run(list(argv), preexec_fn=_preexec(fd, preexec), check=check,
                              timeout=timeout, **kwargs)
    except FileNotFoundError as exc:
        raise EnvironmentProblem(f"{argv[0]} is not installed ({exc})") from None
    finally:
        os.close(fd)


def offloads_off(ns: str, ifname: str) -> None:
    """GRO, GSO, TSO and tx checksum offload off: every packet carries a full checksum
    (a CHECKSUM_PARTIAL packet has nothing for XDP to update incrementally)."""
    run_in(ns, ["ethtool", "-K", ifname, "gro", "off", "gso", "off", "tso", "off",
                "tx", "off"], capture_output=True, text=True)


def set_gro(ns: str, ifname: str, on: bool) -> None:
    run_in(ns, ["ethtool", "-K", ifname, "gro", "on" if on else "off"],
           capture_output=True, text=True)


def offloads(ns: str, ifname: str) -> dict[str, bool]:
    """Feature name -> on, from `ethtool -k` run in the namespace."""
    out = run_in(ns, ["ethtool", "-k", ifname], capture_output=True, text=True).stdout
    feats = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest:
            feats[name.strip()] = rest.split()[0] == "on"
    return feats


# --- nftables ----------------------------------------------------------------------------

def nft_load(ns: str, ruleset: str) -> None:
    """Load a ruleset with `nft -f -` inside the namespace."""
    try:
        run_in(ns, ["nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise HyperplaneError(f"nft refused the lab ruleset in {ns}: {exc.stderr.strip()}") \
            from None


def nft_json(ns: str, *args: str) -> dict:
    """`nft -j <args>` inside the namespace, parsed."""
    out = run_in(ns, ["nft", "-j", *args], capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else {}


def nft_counter(ns: str, family: str, table: str, name: str) -> dict[str, int]:
    """A named nft counter: {'packets': n, 'bytes': n}."""
    data = nft_json(ns, "list", "counter", family, table, name)
    for item in data.get("nftables", []):
        if "counter" in item:
            return {"packets": item["counter"]["packets"], "bytes": item["counter"]["bytes"]}
    raise NotFound(f"no nft counter {family} {table} {name} in {ns}")


# --- addresses of a node (hyperplane.addresses) ------------------------------------------
# These also take ns=None: a node may run in the root namespace of a real host.

@contextlib.contextmanager
def ipr_any(ns: str | None) -> Iterator[IPRoute]:
    """An IPRoute socket in the named namespace, or in this process's own when ns is None."""
    from pyroute2 import IPRoute
    if ns is None:
        with IPRoute() as ip:
            yield ip
    else:
        with ipr(ns) as ip:
            yield ip


def link_names(ns: str | None) -> list[str]:
    with ipr_any(ns) as ip:
        return [link.get_attr("IFLA_IFNAME") for link in ip.get_links()]


def ipv4_addresses(ns: str | None) -> list[dict]:
    """Every IPv4 address of the namespace: ifname, address, prefixlen, label."""
    with ipr_any(ns) as ip:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        return [{"ifname": names.get(a["index"]), "address": a.get_attr("IFA_ADDRESS"),
                 "prefixlen": a["prefixlen"], "label": a.get_attr("IFA_LABEL")}
                for a in ip.get_addr(family=socket.AF_INET)]


def default_route_ifnames(ns: str | None) -> list[str]:
    """Interfaces the IPv4 default routes of the main table leave by, lowest metric first."""
    with ipr_any(ns) as ip:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}
        routes = [r for r in ip.get_routes(family=socket.AF_INET, table=254)
                  if r["dst_len"] == 0]
        routes.sort(key=lambda r: r.get_attr("RTA_PRIORITY") or 0)
        out: list[str] = []
        for r in routes:
            oifs = [r.get_attr("RTA_OIF")] + [hop["oif"] for hop in
                                              (r.get_attr("RTA_MULTIPATH") or [])]
            out += [names[i] for i in oifs if i in names and names[i] not in out]
        return out


def add_labeled_address(ns: str | None, ifname: str, address: str, prefixlen: int,
                        label: str | None = None) -> None:
    """Add an IPv4 address (a label, when given, marks who added it)."""
    with ipr_any(ns) as ip:
        kw: dict[str, Any] = {"label": label} if label else {}
        ip.addr("add", index=_index(ip, ifname), address=address, prefixlen=prefixlen, **kw)


def delete_address(ns: str | None, ifname: str, address: str, prefixlen: int) -> None:
    """Remove an IPv4 address; one already gone (or its interface) is fine."""
    from pyroute2.netlink.exceptions import NetlinkError
    with ipr_any(ns) as ip:
        index = ip.link_lookup(ifname=ifname)
        if not index:
            return
        try:
            ip.addr("del", index=index[0], address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                raise
