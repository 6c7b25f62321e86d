"""The node agent: store -> maps, health checks from the node's namespace, drains."""
import os
import time

import pytest

from hyperplane import netns
from hyperplane.agent import Agent, AgentConfig
from hyperplane.loader import Sizes
from hyperplane.node import start_nat_node, stop_node
from hyperplane.store import Store

NS = f"hpt-agent-{os.getpid() % 100000}"
NODE = f"hpt-agent-{os.getpid() % 100000}"


@pytest.fixture
def node(tmp_path):
    netns.remove(NS)
    netns.create(NS)
    netns.set_up(NS, "lo")
    listener = netns.socket_in(NS)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    closed = netns.socket_in(NS)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        start_nat_node(NODE, [], [], netns=NS, sizes=Sizes(max_flows=4096, max_listeners=4,
                                                           maglev_size=251, max_targets=16))
        yield {"up": listener.getsockname()[1], "down": closed.getsockname()[1],
               "store": str(tmp_path / "store.json")}
    finally:
        listener.close()
        closed.close()
        stop_node(NODE)
        netns.remove(NS)


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


def test_health_drives_the_maglev_table_and_drains_end(node):
    store = Store(node["store"])
    store.update(lambda _: _config(node["up"], node["down"], delay=0))
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        up_id, down_id = f"127.0.0.1:{node['up']}", f"127.0.0.1:{node['down']}"

        def states():
            with open(f"/run/hyperplane/nodes/{NODE}.agent.json") as f:
                import json
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
        store.update(drain)
        assert _tick_until(agent, lambda: up_id not in
                           {f"{t['ip']}:{t['port']}" for t in store.read()["target_groups"][0]["targets"]})
        # only the unhealthy target is left: fail open to it
        assert _tick_until(agent, lambda: {table[table.Key(i)].value for i in range(251)} ==
                           {agent.plane.target_id(down_id)})
    finally:
        agent.shutdown()


def test_a_bad_store_is_reported_and_the_last_good_state_kept(node):
    store = Store(node["store"])
    store.update(lambda _: _config(node["up"], node["down"]))
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        agent.tick(time.monotonic())
        listeners = len(list(agent.dp.table("listeners").items()))
        store.update(lambda d: {**d, "listeners": [{"lb": "nope", "vip": "1.2.3.4", "port": 1,
                                                    "protocol": "TCP", "target_group": "web"}]})
        agent.tick(time.monotonic())
        assert agent.config_error and "nope" in agent.config_error
        assert len(list(agent.dp.table("listeners").items())) == listeners == 1
    finally:
        agent.shutdown()


def test_reset_on_unhealthy_deletes_the_targets_flows(node):
    from hyperplane.flows import now_ns
    cfg = _config(node["up"], node["down"])
    cfg["target_groups"][0]["reset_on_unhealthy"] = True
    cfg["target_groups"][0]["health_check"]["interval_s"] = 0.3
    Store(node["store"]).update(lambda _: cfg)
    agent = Agent(AgentConfig(NODE, node["store"]))
    agent.startup()
    try:
        agent.tick(time.monotonic())  # one failed check: not unhealthy yet
        down = agent.plane.target_id(f"127.0.0.1:{node['down']}")
        up = agent.plane.target_id(f"127.0.0.1:{node['up']}")
        flows = agent.dp.table("flows")
        for i, tid in enumerate((down, down, up)):  # two flows to the failing target, one not
            k = flows.Key()
            k.src_ip, k.src_port, k.proto = 0x01020304 + i, 1000 + i, 6
            v = flows.Leaf()
            v.kind, v.target, v.tcp_state, v.last_seen_ns = 3, tid, 2, now_ns()
            flows[k] = v
        assert _tick_until(agent, lambda: agent.resets == 2)
        left = [v.target for _, v in flows.items()]
        assert left == [up], left
    finally:
        agent.shutdown()
