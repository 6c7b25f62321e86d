"""The one-node lab: network namespaces on this machine, never connected to the host's real
interfaces. One topology for every mode: a NAT client network, an "internet" and three
NLB target hosts around one node.

    {prefix}-client          {prefix}-node1                      {prefix}-inet
    cl0 10.10.0.10/24  <-->  in0 10.10.0.1/24
        10.10.0.11/24        out0 198.18.0.1/24            <-->  inet0 198.18.0.2/24
    default via 10.10.0.1         198.18.0.100/32 (NAT IP)             198.18.0.3/24
                                  198.18.0.200/32 (NLB VIP)
                             tg1 10.20.1.1/24  <-->  {prefix}-t1 eth0 10.20.1.10/24
                             tg2 10.20.2.1/24  <-->  {prefix}-t2 eth0 10.20.2.10/24
                             tg3 10.20.3.1/24  <-->  {prefix}-t3 eth0 10.20.3.10/24
                                                     (targets: default via 10.20.i.1)

Modes (what the node does):
  xdp      the hyperplane data path on in0, out0 and tg1..tg3 (attached as `attach` says:
           auto = tc on veth, native XDP on a NIC that has it): the NAT gateway for the
           client network and (with nlb=True) the NLB "lab-nlb", whose configuration is
           written to a store file and applied by an agent process (health checks, Maglev
           tables, draining). The node adds the NAT IP and the VIP to out0 itself. The node
           kernel's forward chain drops (and counts) anything the data path did not
           redirect, except translated packets it handed over for fragmenting (marked); inet
           has no route back to 10.10.0.0/24.
  kernel   plain kernel forwarding, no NAT (the benchmark floor); inet routes
           10.10.0.0/24 via 198.18.0.1.
  nft      Linux NAT for comparison: forward accept, snat 10.10.0.0/24 to 198.18.0.100.
  haproxy  the NLB baseline: no XDP; HAProxy in TCP mode in the node namespace on
           198.18.0.200:80 with the three targets as servers (roundrobin); the kernel
           forwards the rest (no NAT).
  nftlb    the kernel's own stateful L4 LB as the NLB baseline: no XDP; an nftables DNAT
           of 198.18.0.200:80 to the three targets' :8080, chosen by a hash of the
           5-tuple; the client IP is kept (no SNAT: the targets answer through the node,
           where conntrack reverses the DNAT); no health checks; kernel forwarding.

The multi-node lab (`LabConfig(nodes=N)`, N >= 2, mode xdp or kernel): clients and the
NLB targets behind an inside fabric router, N nodes, an outside fabric router, the
internet host and a sync bridge; both routers steer each resource over its shard's nodes
with resilient nexthop groups. Its plan is `fleet_plan.py`, building it `fleet_build.py`,
and `fabric.py`'s `Fabric(cfg)` is what the lab controller (`controller.py`) calls as
shards and membership change (set_shard, members, cut, restore). In mode xdp every node
runs the data path and a fleet agent sharing one store (LabConfig.store, or a file of the
lab's own), and the controller steers each resource to its shard's live, ready members.

Like a real network, the lab keeps every interface's default offloads (TSO/GSO/GRO,
checksum offload) and resolves neighbours by ARP; the node has a default route toward the
internet host. The plan (`plan.py`: `topology(cfg)`, pure, tested without root), acting on the machine
(`build.py`: `up`, `down`, `status`) and the lab's servers (`servers.py`) are re-exported
here: `from hyperplane import lab; lab.up(lab.LabConfig())`. The targets' servers (`python -m hyperplane.lab serve`) answer HTTP with their
own name and the peer they saw, stream bodies at a bounded rate, and echo UDP. docs/lab.md
has the same tables.
"""
from hyperplane.lab.plan import *  # noqa: F401,F403
from hyperplane.lab.plan import (_forward_policy, _haproxy_cfgfile, _haproxy_pidfile,  # noqa: F401
                                 _pin_root)
from hyperplane.lab.build import (assisted_packets, down, forward_packets, haproxy_pid,  # noqa: F401
                                  namespace_for, present, start_target_server, status, up)
from hyperplane.lab.fabric import Fabric  # noqa: F401
from hyperplane.lab.fleet_plan import FLEET_NAT_IP, FLEET_VIP, fleet_topology  # noqa: F401
from hyperplane.lab.servers import (SERVER_MAX_SECONDS, STREAM_CHUNK, _main,  # noqa: F401
                                    stream_chunks, stream_sha256, target_server_argv)
