"""Acting on the machine: `up` builds the lab's namespaces, links, addresses, routes and
nftables from the plan, starts the node (mode xdp), its agent or HAProxy; `down` removes
everything, even a half-built lab; `status` says what exists. A lab of 2 or more nodes is
built and read by fleet_build.py; `down` is the same for both."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict

from hyperplane import netns
from hyperplane.errors import ConfigError, EnvironmentProblem, HyperplaneError, NotFound
from hyperplane.lab.plan import (haproxy_config, LabConfig, namespaces, NFT_ASSIST_COUNTER,
                                NFT_FAMILY, NFT_FORWARD_COUNTER, nft_ruleset, NFT_TABLE,
                                namespace_pattern, nlb_config, NODE_IFNAMES, ROLES, STATE_DIR,
                                METRICS_PORT, store_path,
                                TARGET_HTTP_PORTS, TARGET_ROLES, TARGET_UDP_PORT, targets,
                                topology, _haproxy_cfgfile, _haproxy_pidfile)
from hyperplane.lab.fabric import state_path as fabric_state_path
from hyperplane.lab.servers import SERVER_MAX_SECONDS, target_server_argv

# --- acting on the machine ---------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem("the lab needs root (it creates network namespaces); "
                                 "run it with sudo")
    for tool, pkg in (("nft", "nftables"), ("ethtool", "ethtool")):
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"the lab needs {tool}: apt-get install {pkg}")


def _state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def _write_state(cfg: LabConfig) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = _state_path(cfg.prefix) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(cfg), f)
    os.replace(tmp, _state_path(cfg.prefix))


def _read_state(prefix: str) -> LabConfig | None:
    try:
        with open(_state_path(prefix)) as f:
            return LabConfig(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def present(prefix: str = "hp") -> list[str]:
    """The lab's namespaces that exist right now (of a one-node or a multi-node lab)."""
    pattern = namespace_pattern(prefix)
    return [n for n in netns.list_namespaces() if pattern.match(n)]


def up(cfg: LabConfig) -> dict:
    """Build the lab; in mode xdp start the node (and, with cfg.nlb, write the NLB store and
    start the agent); in mode haproxy start HAProxy; with cfg.nodes >= 2 build the
    multi-node lab (fleet_build.build). On any failure everything built so far is removed
    again. Returns status(cfg)."""
    cfg.validate()
    _require_root()
    if present(cfg.prefix):
        raise ConfigError(f"lab {cfg.prefix!r} is already up; run hpctl lab down first")
    try:
        _write_state(cfg)
        if cfg.nodes > 1:
            from hyperplane.lab import fleet_build
            fleet_build.build(cfg)
        else:
            _up_one_node(cfg)
    except BaseException:
        down(cfg)
        raise
    return status(cfg)


def _up_one_node(cfg: LabConfig) -> None:
    topo = topology(cfg)
    ns = topo["namespaces"]
    for role in ROLES:
        netns.create(ns[role])
        for key, value in topo["sysctls"][role].items():
            netns.sysctl(ns[role], key, value)
        netns.set_up(ns[role], "lo")
    mac = {(i["role"], i["ifname"]): i["mac"] for i in topo["interfaces"]}
    for a, ia, b, ib in (l["a"].split("/") + l["b"].split("/") for l in topo["links"]):
        netns.veth(ns[a], ia, ns[b], ib, mac_a=mac[(a, ia)], mac_b=mac[(b, ib)])
    for ifc in topo["interfaces"]:
        for cidr in ifc["addresses"]:
            netns.add_address(ifc["netns"], ifc["ifname"], cidr)
    for where in topo["gro_on"]:
        role, ifname = where.split("/")
        netns.set_gro(ns[role], ifname, True)
    for role, routes in topo["routes"].items():
        for r in routes:
            netns.add_route(ns[role], r["dst"], r.get("gateway"))
    netns.nft_load(ns["node"], nft_ruleset(cfg))
    if cfg.mode == "xdp":
        _start_node(cfg, topo)
    if topo["nlb"]["enabled"] and cfg.mode == "xdp":
        _start_agent(cfg, topo)
    if topo["nlb"]["enabled"] and cfg.mode == "haproxy":
        _start_haproxy(cfg)


def _start_agent(cfg: LabConfig, topo: dict) -> None:
    """Write the lab's NLB to the store and start the agent that applies it."""
    try:
        from hyperplane.node.agent import spawn_agent
        from hyperplane.fleet.store import NLB_KEY, open_store
    except ImportError as exc:
        raise HyperplaneError(f"the lab's NLB needs hyperplane.fleet.store and hyperplane.node.agent, "
                              f"which are not available ({exc}); use --no-nlb") from None
    data = nlb_config(cfg).to_dict()
    path = topo["nlb"]["store"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open_store(path) as store:
        store.put(NLB_KEY, data)
    spawn_agent(topo["node"]["name"], path, metrics_addr=f"0.0.0.0:{METRICS_PORT}")


def _stop_agent(cfg: LabConfig, topo: dict) -> list[str]:
    warnings = []
    try:
        from hyperplane.node.agent import stop_agent
    except ImportError:
        stop_agent = None
    if stop_agent is not None:
        try:
            stop_agent(topo["node"]["name"])
        except (NotFound, FileNotFoundError, ProcessLookupError):
            pass
        except Exception as exc:  # the agent is another module: never block teardown on it
            warnings.append(f"stopping the NLB agent of {topo['node']['name']}: "
                            f"{type(exc).__name__}: {exc}")
    leftovers = [store_path(cfg.prefix), store_path(cfg.prefix) + ".lock"]
    try:
        from hyperplane.node.status import status_path
        from hyperplane.node.lifecycle import NODE_STATE_DIR
        leftovers += [status_path(topo["node"]["name"]),
                      os.path.join(NODE_STATE_DIR, f"{topo['node']['name']}.agent.log")]
    except ImportError:
        pass
    for path in leftovers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return warnings


def _start_haproxy(cfg: LabConfig) -> None:
    if shutil.which("haproxy") is None:
        raise EnvironmentProblem("lab mode haproxy needs haproxy: apt-get install haproxy")
    os.makedirs(STATE_DIR, exist_ok=True)
    path = _haproxy_cfgfile(cfg.prefix)
    with open(path, "w") as f:
        f.write(haproxy_config(cfg))
    ns = namespaces(cfg)["node"]
    try:
        # -D: daemon; it lives in the node namespace, so down() ends it with the namespace.
        netns.run_in(ns, ["haproxy", "-D", "-f", path], capture_output=True, text=True,
                     timeout=30)
    except subprocess.CalledProcessError as exc:
        raise HyperplaneError(f"haproxy did not start in {ns}: "
                              f"{(exc.stderr or exc.stdout or '').strip()}") from None


def haproxy_pid(prefix: str) -> int | None:
    try:
        with open(_haproxy_pidfile(prefix)) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None


def _start_node(cfg: LabConfig, topo: dict) -> None:
    from hyperplane.node import lifecycle as node
    from hyperplane.nat.gateway import GatewayConfig
    gws = [GatewayConfig(**g) for g in topo["gateways"]]
    extra = {}
    if cfg.sizes:
        from hyperplane.datapath.loader import Sizes
        extra["sizes"] = Sizes(**cfg.sizes)
    node.start_nat_node(topo["node"]["name"], list(NODE_IFNAMES), gws,
                        netns=topo["node"]["netns"], mode=cfg.attach,
                        pin_root=topo["node"]["pin_root"], timeouts=cfg.timeouts, **extra)


def down(cfg: LabConfig | None = None, *, prefix: str | None = None) -> dict:
    """Remove the lab: stop the node(s) (if they may have been started), kill what runs in
    the lab namespaces, delete every namespace of the prefix (one node or many, whatever
    the state file says). Idempotent; tolerates a half-built lab."""
    prefix = prefix or (cfg.prefix if cfg else "hp")
    state = _read_state(prefix)
    cfg = state or cfg or LabConfig(prefix=prefix)
    cfg.validate()
    _require_root()
    topo = topology(cfg)
    warnings: list[str] = []
    if cfg.nodes > 1:
        from hyperplane.lab import fleet_build
        warnings += fleet_build.stop_nodes(cfg)
        names = [fleet_build.node_name(cfg, i) for i in range(1, cfg.nodes + 1)]
    else:
        if state is None or state.mode == "xdp":
            warnings += _stop_agent(cfg, topo)
            warnings += _stop_node(topo)
        names = [topo["node"]["name"]]
    _remove_flow_logs(names)
    removed = []
    for name in present(prefix):
        try:
            if netns.remove(name):
                removed.append(name)
        except OSError as exc:
            warnings.append(f"could not remove namespace {name}: {exc}")
    for path in (_state_path(prefix), _haproxy_cfgfile(prefix), _haproxy_pidfile(prefix),
                 fabric_state_path(prefix)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return {"prefix": prefix, "removed": removed, "warnings": warnings}


def _remove_flow_logs(names: list[str]) -> None:
    """A lab's nodes' flow logs go with the lab (their agents wrote them to the default
    directory, on /run: a lab is made and unmade many times)."""
    from hyperplane.observe.flowlogs import DEFAULT_DIR
    for name in names:
        shutil.rmtree(os.path.join(DEFAULT_DIR, name), ignore_errors=True)


def _stop_node(topo: dict) -> list[str]:
    ns = topo["node"]["netns"]
    try:
        from hyperplane.node import lifecycle as node
        # Without its namespace there is nothing to detach (and the interface names must
        # never be looked up in the root namespace): only the pins are removed.
        here = netns.exists(ns)
        node.stop_node(topo["node"]["name"], list(NODE_IFNAMES) if here else [],
                       netns=ns if here else None, pin_root=topo["node"]["pin_root"])
    except (HyperplaneError, OSError, KeyError, ValueError) as exc:
        if not netns.exists(ns) or isinstance(exc, (NotFound, FileNotFoundError)):
            return []          # nothing was pinned / attached: normal for a half-built lab
        return [f"stopping node {topo['node']['name']}: {exc}"]
    except Exception as exc:  # the datapath is another module: never block teardown on it
        return [f"stopping node {topo['node']['name']}: {type(exc).__name__}: {exc}"]
    return []


def status(cfg: LabConfig | None = None, *, prefix: str | None = None) -> dict:
    """What exists now, JSON-able. `up` is False (and little else is filled) when the lab's
    namespaces are absent."""
    prefix = prefix or (cfg.prefix if cfg else "hp")
    state = _read_state(prefix)
    cfg = state or cfg or LabConfig(prefix=prefix)
    have = present(prefix)
    if cfg.nodes > 1:
        from hyperplane.lab import fleet_build
        return fleet_build.status(cfg, have, state_known=state is not None)
    topo = topology(cfg)
    out = {
        "prefix": prefix,
        "up": sorted(have) == sorted(topo["namespaces"].values()),
        "mode": cfg.mode if state else None,
        "attach": topo["attach"] if state else None,
        "namespaces": topo["namespaces"],
        "namespaces_present": have,
        "client_addresses": topo["client_addresses"],
        "internet_addresses": topo["internet_addresses"],
        "client_net": topo["client_net"],
        "nat_ips": topo["nat_ips"] if state else [],
        "gateways": topo["gateways"] if state else [],
        "vip": topo["vip"],
        "targets": [{**t, "present": t["netns"] in have} for t in topo["targets"]],
        "nlb": dict(topo["nlb"], enabled=topo["nlb"]["enabled"] and bool(state)),
        "node": dict(topo["node"]),
        "interfaces": [],
        "nft_forward_packets": None,
    }
    if not have:
        return out
    if out["nlb"]["enabled"] and cfg.mode == "xdp":
        out["nlb"]["agent"] = _agent_status(topo["node"]["name"])
    if out["nlb"]["enabled"] and cfg.mode == "haproxy":
        out["nlb"]["haproxy_pid"] = haproxy_pid(prefix)
    by_ns: dict[str, dict[str, dict]] = {}
    for name in have:
        try:
            by_ns[name] = {l["ifname"]: l for l in netns.links(name)}
        except (HyperplaneError, OSError):
            by_ns[name] = {}
    for ifc in topo["interfaces"]:
        live = by_ns.get(ifc["netns"], {}).get(ifc["ifname"])
        out["interfaces"].append({
            "role": ifc["role"], "netns": ifc["netns"], "ifname": ifc["ifname"],
            "peer": ifc["peer"],
            "present": live is not None,
            "mac": live["mac"] if live else ifc["mac"],
            "addresses": live["addresses"] if live else [],
            "state": live["state"] if live else None,
            "xdp": live["xdp"] if live else None,
            "tc": live["tc"] if live else [],
        })
    # where the data path is attached on each node interface: "xdp (native)", "tc", or None
    out["node"]["attached"] = {i["ifname"]: _hook_of(i) for i in out["interfaces"]
                               if i["role"] == "node"}
    if topo["namespaces"]["node"] in have:
        try:
            out["nft_forward_packets"] = netns.nft_counter(
                topo["namespaces"]["node"], NFT_FAMILY, NFT_TABLE, NFT_FORWARD_COUNTER)["packets"]
        except (HyperplaneError, OSError, ValueError, Exception):
            out["nft_forward_packets"] = None
    return out


def _hook_of(ifc: dict) -> str | None:
    from hyperplane.datapath.loader import PROGRAMS
    if ifc["xdp"]:
        return f"xdp ({ifc['xdp']['mode']})"
    if PROGRAMS["tc"][0].decode() in ifc["tc"]:
        return "tc"
    return None


def _agent_status(node: str) -> dict | None:
    """The agent's last status file (per target group, per target: state, flows, packets),
    or None when there is none (yet)."""
    try:
        from hyperplane.node.status import status_path
    except ImportError:
        return None
    try:
        with open(status_path(node)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def forward_packets(cfg: LabConfig) -> int:
    """Packets the node's kernel tried to forward that the data path did not translate
    (mode xdp: all dropped by policy)."""
    return netns.nft_counter(namespaces(cfg)["node"], NFT_FAMILY, NFT_TABLE,
                             NFT_FORWARD_COUNTER)["packets"]


def assisted_packets(cfg: LabConfig) -> int:
    """Translated packets the data path handed the node's kernel to fragment (mode xdp)."""
    return netns.nft_counter(namespaces(cfg)["node"], NFT_FAMILY, NFT_TABLE,
                             NFT_ASSIST_COUNTER)["packets"]


def namespace_for(cfg: LabConfig, role: str) -> str:
    """The namespace of a role: client, node/node1, inet, t1..t3; a multi-node lab (as its
    state file says) also rin, rout, sync and node1..nodeN. NotFound if the lab lacks it."""
    cfg = _read_state(cfg.prefix) or cfg
    roles = namespaces(cfg)
    role = ({"node1": "node"} if cfg.nodes == 1 else {"node": "node1"}).get(role, role)
    if role not in roles:
        raise ConfigError(f"role {role!r} is not one of {', '.join(roles)}")
    name = roles[role]
    if not netns.exists(name):
        raise NotFound(f"lab {cfg.prefix!r} is not up (no namespace {name}); run hpctl lab up")
    return name


def start_target_server(cfg: LabConfig, name: str, *, stdout=None,
                        seconds: float = SERVER_MAX_SECONDS,
                        http_ports=TARGET_HTTP_PORTS,
                        udp_port: int | None = TARGET_UDP_PORT) -> subprocess.Popen:
    """Start the server of target `name` (t1..t3) in its namespace; returns once it listens.
    Stop it with .terminate() (lab down also ends it with the namespace)."""
    t = next((t for t in targets(cfg) if t["name"] == name), None)
    if t is None:
        raise ConfigError(f"no target {name!r}; the lab's targets are {', '.join(TARGET_ROLES)}")
    ns = namespace_for(cfg, name)
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = netns.popen_in(ns, target_server_argv(name, t["ip"], http_ports=http_ports,
                                                 udp_port=udp_port, seconds=seconds),
                          stdout=subprocess.PIPE, stderr=stdout, text=True, env=env)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        proc.wait(5)
        raise HyperplaneError(f"the server of target {name} did not start ({line!r})")
    return proc
