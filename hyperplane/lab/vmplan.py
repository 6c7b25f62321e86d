"""The Vagrant lab's plan: the namespace lab's plan (plan.topology / fleet_plan) laid out
on VMs. Pure: no root, no bcc; vagrant/Vagrantfile runs `python -m hyperplane.lab.vmplan
--json` and builds exactly what it prints, so roles, addresses, MACs, routes and sysctls
have one source, the namespace lab's plan.

How namespaces become VMs:
- nodes = 1 (the reduced lab, vagrant/selftest): the one-node lab's plan without its NLB
  targets. VM "node1" is the node (in0, out0 on virtio NICs); VM "edge" holds client and
  inet, each role in a network namespace of its own inside the VM, named as in the
  namespace lab (hp-client, hp-inet): one VM cannot hold both ends of a route in one
  namespace (a packet to a local address never leaves).
- nodes >= 2: the multi-node lab's plan (fleet_plan.fleet_topology). VMs: "client",
  "fabric" (the inside and outside routers rin and rout, one namespace each),
  "node1".."nodeN", and "inet" (the internet host and the NLB targets t1..t3, one
  namespace each). The sync bridge is not a VM: the nodes' sync0 NICs share one libvirt
  network.
A VM holding one role keeps its NICs in its root namespace (a node's data path attaches
to real virtio NICs there).

The fleet (nodes >= 2), as the namespace fleet lab starts it (fleet_build.start_fleet),
from the same plan: the cluster store is etcd on the store VM (node1), listening only on
its sync0 address (the sync network is the one lab network every node VM is on); node1's
script starts it, then writes the records the namespace lab writes
(fleet_build.fleet_records: /nat, the NAT gateway; /nlb, the NLB and its targets) with
hyperplane.lab.vmstore; every node's script waits (bounded) until the store holds them and
runs `hpctl node up` on the plan's data path interfaces with the plan's sync device and
the store. No lab controller runs on VMs: the fabric keeps the plan's first shards.

Every link of the plan is one libvirt network (veryisolated: no host address, no
forwarding, no DHCP); each NIC gets the plan's MAC, and the provisioning script (`script`)
finds it by MAC, renames it to the plan's name, moves it into its role's namespace and
gives it the plan's addresses, routes, MTU and sysctls. Offloads are left as the driver
sets them and neighbours are resolved by ARP, as on a real network.
Tested without root: tests/unit/test_vagrant.py."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from hyperplane.errors import ConfigError
from hyperplane.lab import fleet_plan
from hyperplane.lab.plan import (CLIENT_NET, NAT_IFNAMES, LabConfig, TARGET_ROLES, gateways,
                                 topology)

PREFIX = "hp"                   # the namespace lab's prefix: the same names inside the VMs
LIBVIRT_PREFIX = "hpv"          # host-side names: libvirt domains and networks
BOX = "hyperplane/deb12"        # vagrant/build-box's box, added under this name
GUEST_REPO = "/opt/hyperplane"  # where the repository is synced (rsync) inside each guest
WHEELS = "vagrant/.wheels"      # the venv's wheels (vagrant/prepare), relative to the repo
DEFAULT_NODES = 2
# The multi-node lab's cluster store: etcd (Debian's etcd-server, in the box: setup.sh
# installs it, build-box disables its service) on the sync0 address of node STORE_NODE.
STORE_NODE = 1
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_NAME = f"{LIBVIRT_PREFIX}-store"
ETCD_DATA_DIR = "/var/lib/hyperplane/etcd"   # a fresh store whenever etcd is (re)started
ETCD_LOG = "/var/log/hyperplane-etcd.log"
ETCD_PID = "/run/hyperplane/etcd.pid"
ETCD_START_S = 120          # etcd answers /health (bounded)
STORE_WAIT_S = 2400         # a node waits for the store VM's setup, etcd and records
NODE_START_S = 1800         # hpctl node up --start-timeout: bcc compiles under emulation
NODE_MEMORY_MB = 2048           # bcc compiles the data path inside the node (clang)
# vagrant-libvirt gives a VM at most nic_adapter_count NICs (default 8, the management NIC
# included); the fabric VM has 2n + 5 lab NICs ("Available interface adapters have been
# exhausted" in the first HP_NODES=2 run)
LIBVIRT_MIN_NIC_ADAPTERS = 8
VM_MEMORY_MB = 1024
# Synced to the guests: the repository without what the host built for itself.
RSYNC_EXCLUDE = [".git/", ".venv/", "__pycache__/", "*.egg-info/", "vagrant/.vagrant/"]


def lab_config(nodes: int) -> LabConfig:
    # mode xdp: the hyperplane data path on the nodes (the plan's default); the fleet's
    # store is etcd on the store node's sync address (store_address)
    if nodes == 1:
        return LabConfig(prefix=PREFIX, nodes=nodes).validate()
    return LabConfig(prefix=PREFIX, nodes=nodes,
                     store=f"etcd://{store_address(nodes)}:{ETCD_CLIENT_PORT}").validate()


def store_address(nodes: int) -> str:
    """The store's address: node STORE_NODE's sync0 address in the plan (the sync
    network joins every node VM, and only them)."""
    topo = fleet_plan.fleet_topology(LabConfig(prefix=PREFIX, nodes=nodes))
    return topo["sync"]["addresses"][STORE_NODE]


def vm_roles(nodes: int) -> dict[str, list[str]]:
    """VM name -> the namespace lab's roles it holds, in order."""
    if nodes == 1:
        return {"node1": ["node"], "edge": ["client", "inet"]}
    return {"client": ["client"], "fabric": list(fleet_plan.ROUTERS),
            **{f"node{i}": [f"node{i}"] for i in range(1, nodes + 1)},
            "inet": ["inet", *TARGET_ROLES]}


def _mac_hex(mac: str) -> str:
    return mac.replace(":", "")


def _network_name(iface: dict) -> str:
    """The libvirt network of a plan interface: one per link, named by its ends; the fleet's
    sync links all join one network (the namespace lab's sync bridge)."""
    if iface.get("kind") == "sync":
        return f"{LIBVIRT_PREFIX}-sync"
    a, b = sorted([f"{iface['role']}-{iface['ifname']}", iface["peer"].replace("/", "-")])
    return f"{LIBVIRT_PREFIX}-{a}-{b}"


def vm_plan(nodes: int = DEFAULT_NODES) -> dict:
    """The Vagrant lab as plain data: the box, the VMs (roles, NICs with network, MAC,
    addresses; memory; the provisioning script) and the networks."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) \
            or not 1 <= nodes <= fleet_plan.MAX_NODES:
        raise ConfigError(f"HP_NODES must be a whole number from 1 to {fleet_plan.MAX_NODES}, "
                          f"not {nodes!r}")
    cfg = lab_config(nodes)
    topo = topology(cfg)
    roles = vm_roles(nodes)
    vm_of = {role: vm for vm, rs in roles.items() for role in rs}
    vms, networks = [], {}
    for vm, vm_roles_ in roles.items():
        multi = len(vm_roles_) > 1
        nics = []
        for ifc in topo["interfaces"]:
            # a link is built when both its ends are on VMs (the one-node lab's target
            # links are not), or it is a node's sync link (the bridge is a network)
            peer_role = ifc["peer"].split("/")[0]
            if ifc["role"] not in vm_roles_ or \
                    (peer_role not in vm_of and ifc.get("kind") != "sync"):
                continue
            net = _network_name(ifc)
            networks.setdefault(net, {"name": net, "mtu": ifc.get("mtu"), "vms": []})
            if vm not in networks[net]["vms"]:
                networks[net]["vms"].append(vm)
            first = ifc["addresses"][0].split("/")
            nics.append({"role": ifc["role"], "ifname": ifc["ifname"], "mac": ifc["mac"],
                         "mac_hex": _mac_hex(ifc["mac"]), "network": net,
                         "addresses": list(ifc["addresses"]), "ip": first[0],
                         "netmask": _netmask(int(first[1])), "mtu": ifc.get("mtu"),
                         "netns": topo["namespaces"][ifc["role"]] if multi else None})
        vms.append({"name": vm, "hostname": f"{LIBVIRT_PREFIX}-{vm}", "roles": vm_roles_,
                    "namespaces": {r: topo["namespaces"][r] for r in vm_roles_} if multi
                    else {}, "nics": nics,
                    "nic_adapter_count": max(LIBVIRT_MIN_NIC_ADAPTERS, len(nics) + 1),
                    "memory": NODE_MEMORY_MB if vm.startswith("node") else VM_MEMORY_MB,
                    "cpus": 1,
                    # the repository is synced to the nodes only: they run setup and hpctl
                    "repo": vm.startswith("node")})
    for net in networks.values():
        net["roles"] = sorted({r for vm in net["vms"] for r in roles[vm]})
    plan = {"prefix": PREFIX, "libvirt_prefix": LIBVIRT_PREFIX, "nodes": nodes, "box": BOX, "guest_repo": GUEST_REPO,
            "wheels": WHEELS, "rsync_exclude": list(RSYNC_EXCLUDE), "vms": vms,
            "networks": sorted(networks.values(), key=lambda n: n["name"]),
            "vm_of_role": vm_of, "nat_ip": _nat_ip(cfg), "client_net": CLIENT_NET,
            "client_addresses": list(topo["client_addresses"]),
            "internet_addresses": list(topo["internet_addresses"]),
            "store": _store(cfg, topo) if nodes > 1 else None,
            "fleet_nodes": _fleet_nodes(topo) if nodes > 1 else []}
    for vm in vms:
        vm["script"] = script(plan, topo, vm)
    return plan


def _store(cfg: LabConfig, topo: dict) -> dict:
    """The fleet's cluster store on VMs: where etcd runs and listens, and the records the
    namespace fleet lab writes into its store before any agent starts."""
    from hyperplane.lab.fleet_build import fleet_records
    role = f"node{STORE_NODE}"
    sync = next(i for i in topo["interfaces"] if i["role"] == role and i["kind"] == "sync")
    address = sync["addresses"][0].split("/")[0]
    return {"kind": "etcd", "vm": role, "role": role, "ifname": sync["ifname"],
            "address": address, "url": topo["fleet"]["store"],
            "client_url": f"http://{address}:{ETCD_CLIENT_PORT}",
            "peer_url": f"http://{address}:{ETCD_PEER_PORT}", "name": ETCD_NAME,
            "data_dir": ETCD_DATA_DIR, "log": ETCD_LOG, "pid_file": ETCD_PID,
            "records": fleet_records(cfg, topo)}


def _fleet_nodes(topo: dict) -> list[dict]:
    """Per node VM: what its `hpctl node up` gets from the plan (fleet_build.start_datapath
    and start_fleet: the data path's interfaces, the outside one, the sync device)."""
    out = []
    for n in topo["fleet_nodes"]:
        outside = next(i["ifname"] for i in topo["interfaces"]
                       if i["role"] == n["role"] and i["kind"] == "outside")
        out.append({"vm": n["role"], "name": n["name"],
                    "ifnames": list(topo["fleet"]["datapath_ifnames"]),
                    "outside_if": outside, "sync_dev": topo["fleet"]["sync_dev"],
                    "attach": topo["fleet"]["attach"]})
    return out


def _netmask(bits: int) -> str:
    import ipaddress
    return str(ipaddress.ip_network(f"0.0.0.0/{bits}").netmask)


def _nat_ip(cfg: LabConfig) -> str:
    return gateways(cfg)[0]["nat_ips"][0]


# --- the provisioning script (bash, run as root in the guest) ----------------------------

_PRELUDE = """set -euo pipefail
# the NIC with this MAC, wherever it is named now (empty when it was moved already)
nic_by_mac() { for d in /sys/class/net/*; do
    [ "$(cat "$d/address")" = "$1" ] && { basename "$d"; return 0; }; done; return 0; }
"""


def _in(ns: str | None, *cmd: str) -> str:
    """A command run in the role's namespace (or the VM's root namespace)."""
    words = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return " ".join(shlex.quote(w) for w in words)


def _ip(ns: str | None, *args: str) -> str:
    return " ".join(shlex.quote(w) for w in (["ip"] + (["-n", ns] if ns else []) + list(args)))


def script(plan: dict, topo: dict, vm: dict) -> str:
    """The bash that makes this VM what the plan says: namespaces, NICs (by MAC: renamed,
    moved, MTU, addresses, up), sysctls, routes; on the fabric VM the routers' nexthop
    groups, tables and rules; on a node VM the project's setup (offline), then in the
    one-node lab `hpctl nat up` on in0/out0, in the multi-node lab the fleet (_fleet)."""
    lines = [_PRELUDE]
    for role in vm["roles"]:
        ns = vm["namespaces"].get(role)
        lines.append(f"# role {role}" + (f" (namespace {ns})" if ns else ""))
        if ns:
            lines.append(f"ip netns list | grep -qx {shlex.quote(ns)} || "
                         f"ip netns add {shlex.quote(ns)}")
            lines.append(_ip(ns, "link", "set", "lo", "up"))
        for key, value in sorted(topo["sysctls"].get(role, {}).items()):
            lines.append(_in(ns, "sysctl", "-qw", f"{key}={value}"))
        for nic in (n for n in vm["nics"] if n["role"] == role):
            name = nic["ifname"]
            lines += _claim_nic(nic, ns)
            if nic["mtu"]:
                lines.append(_ip(ns, "link", "set", name, "mtu", str(nic["mtu"])))
            for addr in nic["addresses"]:
                lines.append(_ip(ns, "addr", "replace", addr, "dev", name))
            lines.append(_ip(ns, "link", "set", name, "up"))
        for route in topo["routes"].get(role, []):
            lines.append(_ip(ns, "route", "replace", route["dst"], "via", route["gateway"]))
        if role in topo.get("steering", {}):
            lines += _steering(topo, role, ns)
    if any(r.startswith("node") for r in vm["roles"]):
        lines += _node_setup(plan, topo, vm)
    return "\n".join(lines) + "\n"


def _claim_nic(nic: dict, ns: str | None) -> list[str]:
    """Find the NIC by its MAC and give it the plan's name, in its role's namespace. In a
    namespace it is renamed there (several roles' NICs share a name, e.g. the targets'
    eth0, and eth0 is the VM's management NIC), going through a name made of its MAC."""
    mac, name = nic["mac"], nic["ifname"]
    tmp = f"t{nic['mac_hex']}"
    missing = f"echo {shlex.quote(f'no NIC with MAC {mac} for {name}')} >&2; exit 1"
    if ns:
        return [f"dev=\"$(nic_by_mac {mac})\"",
                f"if [ -n \"$dev\" ]; then ip link set \"$dev\" down; "
                f"ip link set \"$dev\" name {tmp}; ip link set {tmp} netns {shlex.quote(ns)}; "
                f"{_ip(ns, 'link', 'set', tmp, 'name', name)}; fi",
                f"{_ip(ns, 'link', 'show', name)} >/dev/null 2>&1 || {{ {missing}; }}"]
    return [f"dev=\"$(nic_by_mac {mac})\"",
            f"[ -n \"$dev\" ] || {{ {missing}; }}",
            f"if [ \"$dev\" != {name} ]; then ip link set \"$dev\" down; "
            f"ip link set \"$dev\" name {name}; fi"]


def _steering(topo: dict, router: str, ns: str | None) -> list[str]:
    """A fabric router's ECMP: one nexthop per node, one resilient group per resource over
    its first shard (the namespace lab's controller reprograms these as membership changes;
    the VM lab keeps the first shards), the routes that use the groups and the rules."""
    steer = topo["steering"][router]
    res = steer["resilient"]
    out = []
    for nh in steer["nexthops"]:
        out.append(_ip(ns, "nexthop", "replace", "id", str(nh["id"]), "via", nh["via"],
                       "dev", nh["dev"]))
    for resource, members in topo["shards"].items():
        group = "/".join(str(i) for i in members)
        out.append(_ip(ns, "nexthop", "replace", "id", str(steer["groups"][resource]),
                       "group", group, "type", "resilient", "buckets", str(res["buckets"]),
                       "idle_timer", str(res["idle_timer"]),
                       "unbalanced_timer", str(res["unbalanced_timer"])))
    for route in steer["routes"]:
        gid = str(steer["groups"][route["resource"]])
        out.append(_ip(ns, "route", "replace", route["dst"], "nhid", gid,
                       "table", str(route["table"])))
    for rule in steer["rules"]:
        out.append(f"{_ip(ns, 'rule', 'del', 'priority', str(rule['priority']))} 2>/dev/null "
                   "|| true")
        out.append(_ip(ns, "rule", "add", "priority", str(rule["priority"]), "from",
                       rule["from"], "to", rule["to"], "table", str(rule["table"])))
    return out


def _node_setup(plan: dict, topo: dict, vm: dict) -> list[str]:
    repo = shlex.quote(plan["guest_repo"])
    wheels = shlex.quote(f"{plan['guest_repo']}/{plan['wheels']}")
    out = ["# the project's own setup, offline: the box holds its Debian packages, the",
           "# synced repository the venv's wheels",
           f"PIP_NO_INDEX=1 PIP_FIND_LINKS={wheels} {repo}/scripts/setup.sh"]
    if plan["nodes"] == 1:
        gw = topo["gateways"][0] if topo["gateways"] else None
        if gw is None:
            raise ConfigError("the one-node VM lab's plan has no NAT gateway (mode xdp)")
        ifs = [a for n in NAT_IFNAMES for a in ("--if", n)]
        nat = [w for ip in gw["nat_ips"] for w in ("--nat-ip", ip)]
        inside = [w for c in gw["inside_cidrs"] for w in ("--inside", c)]
        out.append(" ".join(shlex.quote(w) for w in [
            f"{plan['guest_repo']}/.venv/bin/hpctl", "nat", "up", "--node",
            topo["node"]["name"], *ifs, *nat, *inside]))
    else:
        out += _fleet(plan, vm)
    return out


def _fleet(plan: dict, vm: dict) -> list[str]:
    """A node VM of the multi-node lab: on the store VM, etcd (started unless it runs,
    with a fresh data dir; bounded wait for /health) and the plan's records; on every node,
    a bounded wait until the store holds them, then `hpctl node up`."""
    store = plan["store"]
    q = shlex.quote
    py = f"{plan['guest_repo']}/.venv/bin/python"
    out = []
    if vm["name"] == store["vm"]:
        pid, log = q(store["pid_file"]), q(store["log"])
        etcd = " ".join(q(w) for w in [
            "etcd", "--name", store["name"], "--data-dir", store["data_dir"],
            "--listen-client-urls", store["client_url"],
            "--advertise-client-urls", store["client_url"],
            "--listen-peer-urls", store["peer_url"],
            "--initial-advertise-peer-urls", store["peer_url"],
            "--initial-cluster", f"{store['name']}={store['peer_url']}",
            "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn"])
        health = (f"curl -fsS --max-time 2 {q(store['client_url'] + '/health')} 2>/dev/null "
                  "| grep -q '\"health\":\"true\"'")
        records = json.dumps(store["records"], sort_keys=True)
        out += [
            f"# the fleet's cluster store: etcd on {store['ifname']} {store['address']} only "
            "(the sync network: every node VM is on it), not started by systemd",
            f"mkdir -p {q(store['pid_file'].rsplit('/', 1)[0])} "
            f"{q(store['data_dir'].rsplit('/', 1)[0])}",
            f"if ! {{ [ -s {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; }}; then",
            f"    rm -rf {q(store['data_dir'])}",
            f"    nohup setsid {etcd} </dev/null >>{log} 2>&1 &",
            f"    echo $! >{pid}",
            "fi",
            f"for _ in $(seq {ETCD_START_S}); do {health} && break; sleep 1; done",
            f"{health} || {{ echo 'etcd did not answer on {store['client_url']} within "
            f"{ETCD_START_S} s; {store['log']} ends:' >&2; tail -n 20 {log} >&2; exit 1; }}",
            "# the records the namespace fleet lab writes (fleet_build.fleet_records)",
            f"{q(py)} -m hyperplane.lab.vmstore put {q(store['url'])} <<'HP_RECORDS'",
            records,
            "HP_RECORDS",
        ]
    node = next(n for n in plan["fleet_nodes"] if n["vm"] == vm["name"])
    ifs = [w for i in node["ifnames"] for w in ("--if", i)]
    mode = ["--mode", node["attach"]] if node["attach"] not in (None, "auto") else []
    keys = [w for k in store["records"] for w in ("--key", k)]
    out += [
        "# the fleet: once the store holds the records, this node's agent (it loads the "
        "data path and joins the fleet)",
        " ".join(q(w) for w in [py, "-m", "hyperplane.lab.vmstore", "wait", store["url"],
                                *keys, "--timeout", str(STORE_WAIT_S)]),
        " ".join(q(w) for w in [
            f"{plan['guest_repo']}/.venv/bin/hpctl", "node", "up", "--node", node["name"],
            *ifs, "--outside-if", node["outside_if"], "--sync-dev", node["sync_dev"], *mode,
            "--store", store["url"], "--start-timeout", str(NODE_START_S)]),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperplane.lab.vmplan",
                                 description="The Vagrant lab's plan (from the lab's plan).")
    ap.add_argument("--nodes", default=str(DEFAULT_NODES),
                    help="node VMs (HP_NODES); 1 is the reduced lab")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--script", metavar="VM", help="print this VM's provisioning script")
    args = ap.parse_args(argv)
    try:
        if not args.nodes.isdigit():
            raise ConfigError(f"HP_NODES must be a whole number from 1 to "
                              f"{fleet_plan.MAX_NODES}, not {args.nodes!r}")
        plan = vm_plan(int(args.nodes))
        if args.script:
            found = [vm for vm in plan["vms"] if vm["name"] == args.script]
            if not found:
                raise ConfigError(f"no VM {args.script!r} in this plan (VMs: "
                                  f"{', '.join(vm['name'] for vm in plan['vms'])})")
            sys.stdout.write(found[0]["script"])
        elif args.json:
            json.dump(plan, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            for vm in plan["vms"]:
                print(f"{vm['name']:8} {','.join(vm['roles']):20} "
                      + " ".join(f"{n['ifname']}={','.join(n['addresses'])}" for n in vm["nics"]))
    except ConfigError as e:
        print(f"vmplan: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
