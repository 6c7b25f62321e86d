"""The node agent: store -> maps, health checks from the node's namespace, drains, the
VIP addresses it adds, and that no bad store stops it."""
import contextlib
import json
import os
import time

import pytest

from hyperplane import netns
from hyperplane.node.agent import Agent, AgentConfig, read_status, status_path
from hyperplane.datapath.flows import now_ns
from hyperplane.observe.metrics import load_balancer_metrics
from hyperplane.datapath.loader import Sizes
from hyperplane.nat.gateway import GatewayConfig
from hyperplane.node.lifecycle import start_nat_node, stop_node
from hyperplane.fleet.store import NLB_KEY, open_store
from hyperplane.datapath.verdicts import FlowKind, TcpState

NS = f"hpt-agent-{os.getpid() % 100000}"
NODE = f"hpt-agent-{os.getpid() % 100000}"
NAT_IP = "198.18.0.100"


@contextlib.contextmanager
def _running_node(ns: str, name: str, store: str):
    """A node (NAT gateway, no interfaces) in its own namespace, with a listening and a
    refusing local port for health checks; stopped and removed afterwards."""
    netns.remove(ns)
    netns.create(ns)
    netns.set_up(ns, "lo")
    listener = netns.socket_in(ns)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    closed = netns.socket_in(ns)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        # an outside interface for the NAT IP and the VIPs (its peer leads nowhere)
        netns.veth(ns, "out0", ns, "out0p")
        netns.add_address(ns, "out0", "198.18.0.1/24")
        start_nat_node(name, [], [GatewayConfig("gw", 0, [NAT_IP], ["10.10.0.0/24"])],
                       netns=ns, sizes=Sizes(max_flows=4096, max_listeners=4,
                                             maglev_size=251, max_targets=16))
        yield {"up": listener.getsockname()[1], "down": closed.getsockname()[1],
               "store": store, "name": name}
    finally:
        listener.close()
        closed.close()
        try:
            stop_node(name)
        finally:
            netns.remove(ns)


@pytest.fixture
def node(tmp_path):
    with _running_node(NS, NODE, str(tmp_path / "store.json")) as n:
        yield n


@pytest.fixture(scope="module")
def bad_store_node():
    """One node for every bad-store case (a compile each saved): a case changes only the
    listeners, which its own store sets again first, and one expired flow, which the
    agent's garbage collection removes. Its own names: the other tests' nodes come and go
    while it runs."""
    with _running_node(f"{NS}-b", f"{NODE}-b", "") as n:
        yield n


def _config(up, down, delay=300):
    return {"load_balancers": [{"name": "lb", "lb_id": 0}],
            "listeners": [{"lb": "lb", "vip": "198.18.0.200", "port": 80, "protocol": "TCP",
                           "target_group": "web"}],
            "target_groups": [{"name": "web", "deregistration_delay_s": delay,
                               "health_check": {"interval_s": 0.1, "timeout_s": 0.1,
                                                "healthy_threshold": 2, "unhealthy_threshold": 2,
                                                "allow_fast": True},
                               "targets": [{"ip": "127.0.0.1", "port": up},
                                           {"ip": "127.0.0.1", "port": down}]}]}


def _tick_until(agent, cond, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        agent.tick(time.monotonic())
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_health_drives_the_maglev_table_and_drains_end(node, store):
    # on both store backends (the `store` fixture): a file and etcd
    store.put(NLB_KEY, _config(node["up"], node["down"], delay=0))
    agent = Agent(AgentConfig(NODE, store.url))
    agent.startup()
    try:
        up_id, down_id = f"127.0.0.1:{node['up']}", f"127.0.0.1:{node['down']}"

        def states():
            with open(status_path(NODE)) as f:
                return {k: v["state"] for k, v in json.load(f)["target_groups"]["web"].items()}

        assert _tick_until(agent, lambda: states() == {up_id: "healthy", down_id: "unhealthy"}), \
            states()
        table = agent.dp.table("maglev")
        row = {table[table.Key(i)].value for i in range(251)}
        assert row == {agent.plane.target_id(up_id)}, "the unhealthy target is still in the table"

        # deregister the healthy one with no flows and delay 0: the drain ends at once
        def drain(data):
            for t in data["target_groups"][0]["targets"]:
                if t["port"] == node["up"]:
                    t["state"], t["draining_since"] = "draining", time.time()
            return data
        store.update(NLB_KEY, drain)
        assert _tick_until(agent, lambda: up_id not in
                           {f"{t['ip']}:{t['port']}"
                            for t in store.get(NLB_KEY).value["target_groups"][0]["targets"]})
        # only the unhealthy target is left: fail open to it
        assert _tick_until(agent, lambda: {table[table.Key(i)].value for i in range(251)} ==
                           {agent.plane.target_id(down_id)})
    finally:
        agent.shutdown()


def test_a_bad_store_is_reported_and_the_last_good_state_kept(node):
    store = open_store(node["store"])
    store.put(NLB_KEY, _config(node["up"], node["down"]))
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        agent.tick(time.monotonic())
        listeners = len(list(agent.dp.table("listeners").items()))
        store.update(NLB_KEY, lambda d: {**d, "listeners": [{"lb": "nope", "vip": "1.2.3.4", "port": 1,
                                                    "protocol": "TCP", "target_group": "web"}]})
        agent.tick(time.monotonic())
        assert agent.config_error and "nope" in agent.config_error
        assert len(list(agent.dp.table("listeners").items())) == listeners == 1
    finally:
        agent.shutdown()


def test_reset_on_unhealthy_deletes_the_targets_flows(node):
    cfg = _config(node["up"], node["down"])
    cfg["target_groups"][0]["reset_on_unhealthy"] = True
    cfg["target_groups"][0]["health_check"]["interval_s"] = 0.3
    open_store(node["store"]).put(NLB_KEY, cfg)
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        agent.tick(time.monotonic())  # one failed check: not unhealthy yet
        down = agent.plane.target_id(f"127.0.0.1:{node['down']}")
        up = agent.plane.target_id(f"127.0.0.1:{node['up']}")
        lid = agent.plane.state.listener_ids[("198.18.0.200", 80, 6)]
        flows = agent.dp.table("flows")
        for i, tid in enumerate((down, down, up)):  # two flows to the failing target, one not
            k = flows.Key()
            k.src_ip, k.src_port, k.proto = 0x01020304 + i, 1000 + i, 6
            v = flows.Leaf()
            v.kind, v.target, v.tcp_state, v.last_seen_ns = FlowKind.NLB_IN, tid, \
                TcpState.ESTABLISHED, now_ns()
            v.resource = lid
            flows[k] = v
        stats = agent.dp.table("lb_stats")   # the data path confirmed these three flows
        per_cpu = stats[lid]
        per_cpu[0].flows_confirmed += 3
        stats[lid] = per_cpu
        assert load_balancer_metrics(agent.dp)[0]["ActiveFlowCount"] == 3
        assert _tick_until(agent, lambda: agent.resets == 2)
        left = [v.target for _, v in flows.items()]
        assert left == [up], left
        assert load_balancer_metrics(agent.dp)[0]["ActiveFlowCount"] == 1
    finally:
        agent.shutdown()


def _listeners(agent):
    return sorted(bytes(k) + bytes(v) for k, v in agent.dp.table("listeners").items())


def _expired_flow(agent):
    """An NLB flow idle since the clock began: the next garbage collection removes it."""
    flows = agent.dp.table("flows")
    k = flows.Key()
    k.src_ip, k.src_port, k.proto = 0x0A0B0C0D, 4242, 6
    v = flows.Leaf()
    v.kind, v.tcp_state, v.last_seen_ns = FlowKind.NLB_IN, TcpState.ESTABLISHED, 1
    flows[k] = v
    return lambda: any(bytes(key) == bytes(k) for key in flows.keys())


def _too_many_listeners(up, down):
    cfg = _config(up, down)
    cfg["listeners"] = [{**cfg["listeners"][0], "port": p} for p in range(80, 85)]
    return cfg


def _vip_is_the_nat_ip(up, down):
    cfg = _config(up, down)
    cfg["listeners"][0]["vip"] = NAT_IP
    return cfg


@pytest.mark.parametrize("bad, words", [
    (b'{"load_balancers": [{"name": "lb", "lb', "is not valid JSON"),
    (b"", "is not valid JSON"),
    (b"\xff\xfe\x00\x01", "is not valid JSON"),
    (b"[]", "must hold a JSON object"),
    (_too_many_listeners, "5 listeners need 5 listener slots"),
    (_vip_is_the_nat_ip, "the VIP is a NAT IP of this node"),
], ids=["truncated", "empty", "not UTF-8", "not an object", "over capacity", "VIP = NAT IP"])
def test_a_bad_store_never_stops_the_agent(bad_store_node, tmp_path, bad, words):
    node, path = bad_store_node, str(tmp_path / "store.json")
    good = _config(node["up"], node["down"])
    store = open_store(path)
    store.put(NLB_KEY, good)
    agent = Agent(AgentConfig(node["name"], path, gc_every_s=0))
    agent.startup()
    try:
        agent.tick(time.monotonic())
        listeners = _listeners(agent)
        assert len(listeners) == 1 and agent.config_error is None
        if isinstance(bad, bytes):   # the file itself damaged
            with open(path, "wb") as f:
                f.write(bad)
        else:                        # a good file holding a bad configuration
            store.put(NLB_KEY, bad(node["up"], node["down"]))
        flow_left = _expired_flow(agent)
        agent.tick(time.monotonic())
        assert agent.config_error and words in agent.config_error, agent.config_error
        assert _listeners(agent) == listeners, "the last good state was not kept"
        assert not flow_left(), "garbage collection stopped with the bad store"
        status = read_status(node["name"])
        assert words in status["config_error"] and set(status["target_groups"]) == {"web"}
        # fixed: applied again, the error is gone (a damaged file is fixed by starting anew)
        if isinstance(bad, bytes):
            os.unlink(path)
        store.put(NLB_KEY, good)
        agent.tick(time.monotonic())
        assert agent.config_error is None and read_status(node["name"])["config_error"] is None
    finally:
        agent.shutdown()


def _addresses():
    return {a["address"]: a["label"] for a in netns.ipv4_addresses(NS) if a["prefixlen"] == 32}


def test_the_agent_adds_the_vips_it_needs_and_removes_only_its_own(node):
    netns.add_address(NS, "out0", "198.18.0.201/32")   # the user's own VIP address
    cfg = _config(node["up"], node["down"])
    cfg["listeners"].append({**cfg["listeners"][0], "vip": "198.18.0.201"})
    open_store(node["store"]).put(NLB_KEY, cfg)
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        agent.tick(time.monotonic())
        assert _addresses()["198.18.0.200"] == "out0:hp"
        assert _addresses()["198.18.0.201"] == "out0"
        assert _addresses()[NAT_IP] == "out0:hp", "nat up did not add its NAT IP"

        def drop_listeners(data):
            data["listeners"] = []
            return data
        open_store(node["store"]).update(NLB_KEY, drop_listeners)
        agent.tick(time.monotonic())
        assert "198.18.0.200" not in _addresses(), "a VIP the agent added stayed"
        assert "198.18.0.201" in _addresses(), "the agent removed the user's address"

        open_store(node["store"]).put(NLB_KEY, cfg)
        agent.tick(time.monotonic())
        assert "198.18.0.200" in _addresses()
    finally:
        agent.shutdown()
    stop_node(NODE)   # nat down: every address hyperplane added goes, the user's stays
    assert set(_addresses()) == {"198.18.0.201"}
