"""A namespace where BPF_PROG_TEST_RUN runs of the data path route like the lab's node, for
the packet tests and the per-packet benchmark.

The program looks up its next hop (bpf_fib_lookup) in the namespace of the thread that
calls test_run, so that thread must be in a namespace with the node's addresses, routes
and neighbours. The veth peers here lead nowhere: nothing leaves the namespace."""
from __future__ import annotations

from hyperplane import netns

CLIENT, CLIENT2 = "10.10.0.10", "10.10.0.11"
INET, INET2 = "198.18.0.2", "198.18.0.3"
ROUTER = "198.18.0.254"          # an intermediate router (ICMP errors; the default route)
NAT_IP, NAT_IP2 = "198.18.0.100", "198.18.0.101"
VIP = "198.18.0.200"             # a load balancer listener's address
TARGETS = ["10.20.1.10", "10.20.2.10", "10.20.3.10"]
MAC = {"in0": "02:00:00:00:01:01", "in0p": "02:00:00:00:01:02",
       "out0": "02:00:00:00:02:01", "out0p": "02:00:00:00:02:02",
       "tg0": "02:00:00:00:03:01", "tg0p": "02:00:00:00:03:02",
       "sync0": "02:00:00:00:04:01", "sync0p": "02:00:00:00:04:02"}
CLIENT_MAC, INET_MAC, TARGET_MAC = "02:00:00:00:00:10", "02:00:00:00:00:02", "02:00:00:00:00:20"
IFNAMES = ("in0", "out0", "tg0", "sync0")  # inside, outside, targets, the fleet's sync network
# The node's own address on each interface (the source of the ICMP errors it sends).
NODE_IP = {"in0": "10.10.0.1", "out0": "198.18.0.1", "tg0": "10.20.0.1", "sync0": "10.99.0.1"}
# Fleet: the sync interface (a peer's second-chance packets arrive there, this node's
# leave through it) and MACs for the peers on it (sync0p stands for the network).
SYNC_IF = "sync0"
PEER_MACS = ("02:00:00:00:04:11", "02:00:00:00:04:12", "02:00:00:00:04:13")
# Hosts on a connected network with no neighbour entry (their MAC is not known yet): an
# outside destination, an inside client, a target.
INET_NO_NEIGH, CLIENT_NO_NEIGH, TARGET_NO_NEIGH = "198.18.0.7", "10.10.0.12", "10.20.4.10"
# Routers that only ever appear as sources (of ICMP errors): inside, on the targets' side.
INSIDE_ROUTER, TARGET_ROUTER = "10.10.0.254", "10.20.0.254"
# A network behind ROUTER whose route has a small MTU (the node's interfaces have 1500).
SMALL_MTU_NET, SMALL_MTU_HOST, SMALL_MTU = "198.19.128.0/24", "198.19.128.1", 1280
RTAX_MTU = 2  # linux/rtnetlink.h: the MTU metric (its bit in RTAX_LOCK locks it)


def build(ns: str, *, default_route: bool = False) -> dict[str, int]:
    """Create the namespace; return the ifindex of each node interface (sync0 too: the
    fleet tests' sync network, leading nowhere like the others). With
    default_route, 198.19.0.0/16 and the rest are reachable behind ROUTER;
    SMALL_MTU_NET always is, with a route MTU of SMALL_MTU."""
    netns.create(ns)
    for ifname in IFNAMES:
        netns.veth(ns, ifname, ns, f"{ifname}p", mac_a=MAC[ifname], mac_b=MAC[f"{ifname}p"])
    for ifname in ("lo", *IFNAMES, *(f"{i}p" for i in IFNAMES)):
        netns.set_up(ns, ifname)
    for ifname, cidr in (("in0", f"{NODE_IP['in0']}/24"), ("out0", f"{NODE_IP['out0']}/24"),
                         ("out0", f"{NAT_IP}/32"), ("out0", f"{VIP}/32"),
                         ("tg0", f"{NODE_IP['tg0']}/16"), ("sync0", f"{NODE_IP['sync0']}/24")):
        netns.add_address(ns, ifname, cidr)
    for ifname, ips, mac in (("in0", (CLIENT, CLIENT2), CLIENT_MAC),
                             ("out0", (INET, INET2, ROUTER), INET_MAC),
                             ("tg0", TARGETS, TARGET_MAC)):
        for ip in ips:
            netns.add_neighbour(ns, ifname, ip, mac)
    if default_route:
        netns.add_route(ns, "default", gateway=ROUTER)
    with netns.ipr(ns) as ip:  # netns.add_route has no MTU
        # locked (`mtu lock`): bpf_fib_lookup() honours a route's MTU only when it is
        # locked (or with net.ipv4.ip_forward_use_pmtu), unlike the kernel's forwarding
        ip.route("add", dst=SMALL_MTU_NET, gateway=ROUTER,
                 metrics={"mtu": SMALL_MTU, "lock": 1 << RTAX_MTU})
    netns.sysctl(ns, "net.ipv4.ip_forward", 1)
    import socket
    return {i: netns.call_in(ns, socket.if_nametoindex, i) for i in IFNAMES}
