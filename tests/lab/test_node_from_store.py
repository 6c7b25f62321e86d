"""A node run from the cluster store (`hpctl node up`): its agent loads and attaches the
data path, runs the NAT gateways whose shard names it (`hpctl nat create` / `delete`), and
serves load balancers with no NAT gateway at all. Real curl and http.server through the
one-node lab; every request is seen in the data path's verdicts, and the node's kernel
forwards nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hyperplane import lab, netns
from hyperplane.fleet.store import NLB_KEY, open_store
from hyperplane.node.agent import status_path

from lab_harness import ATTACH, build_lab, lab_prefix

HPCTL = os.path.join(os.path.dirname(sys.executable), "hpctl")
HTTP_PORT = 8000


def hpctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HPCTL, *args], capture_output=True, text=True, timeout=180)


def wait_for(what: str, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.1)


def agent_nat(node: str) -> dict:
    try:
        with open(status_path(node)) as f:
            return json.load(f).get("nat") or {}
    except (FileNotFoundError, ValueError):
        return {}


def node_addresses(ns: str) -> set[tuple[str, str]]:
    return {(a["ifname"], a["address"]) for a in netns.ipv4_addresses(ns)}


def curl(ns: str, url: str, timeout: float = 3.0) -> str | None:
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", str(timeout), url],
                         capture_output=True, text=True, timeout=timeout + 10)
    return out.stdout if out.returncode == 0 else None


@pytest.fixture(scope="module")
def store_node(request, tmp_path_factory):
    """The one-node lab without its NAT node; the node started again by hpctl node up on
    the same interfaces, with a store of its own and no gateway."""
    the_lab = build_lab(request, lab.LabConfig(prefix=lab_prefix("s"), attach=ATTACH,
                                               nlb=False))
    node = lab.node_name(the_lab.cfg)
    ns = the_lab.node
    store = str(tmp_path_factory.mktemp("store") / "store.json")
    down = hpctl("nat", "down", "--node", node)
    assert down.returncode == 0, down.stderr
    up = hpctl("node", "up", "--node", node, "--netns", ns, *(a for i in lab.NODE_IFNAMES
                                                            for a in ("--if", i)),
               "--store", store)
    request.addfinalizer(lambda: hpctl("node", "down", "--node", node))
    assert up.returncode == 0, up.stderr
    wait_for("the agent to apply the (empty) NAT of the store",
             lambda: agent_nat(node).get("gateways") == [])
    server = subprocess.Popen(["ip", "netns", "exec", the_lab.inet, sys.executable, "-m",
                               "http.server", str(HTTP_PORT), "--bind", lab.INET_IPS[0]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    request.addfinalizer(server.kill)
    return the_lab, node, store, server


def test_the_store_gateway_is_run_and_removed(store_node):
    the_lab, node, store, server = store_node
    url = f"http://{lab.INET_IPS[0]}:{HTTP_PORT}/"
    v0 = the_lab.counters()
    assert curl(the_lab.client, url, timeout=2) is None, "NAT worked with no gateway"
    no_gw = the_lab.counters()
    # not the node's traffic: handed to its kernel (the lab's forward chain drops it)
    assert no_gw.get("PASS_NO_RESOURCE", 0) > v0.get("PASS_NO_RESOURCE", 0)
    assert no_gw.get("TX_NAT_OUT", 0) == v0.get("TX_NAT_OUT", 0)

    created = hpctl("nat", "create", "gw1", "--nat-ip", lab.NAT_IP, "--inside",
                    lab.CLIENT_NET, "--store", store)
    assert created.returncode == 0, created.stderr
    wait_for("the agent to run gw1", lambda: agent_nat(node).get("gateways") == ["gw1"])
    assert ("out0", lab.NAT_IP) in node_addresses(the_lab.node)
    fwd0 = the_lab.forward_packets()
    assert curl(the_lab.client, url) is not None, "no answer through the store's gateway"
    assert the_lab.forward_packets() == fwd0, "the node's kernel forwarded packets"
    v1 = the_lab.counters()
    assert v1.get("TX_NAT_OUT", 0) > v0.get("TX_NAT_OUT", 0)
    assert v1.get("TX_NAT_IN", 0) > v0.get("TX_NAT_IN", 0)

    deleted = hpctl("nat", "delete", "gw1", "--store", store)
    assert deleted.returncode == 0, deleted.stderr
    wait_for("the agent to drop gw1", lambda: agent_nat(node).get("gateways") == [])
    assert lab.NAT_IP not in {ip for _, ip in node_addresses(the_lab.node)}
    assert curl(the_lab.client, url, timeout=2) is None, "NAT still worked after delete"
    again = hpctl("nat", "delete", "gw1", "--store", store)
    assert again.returncode == 4 and "no NAT gateway 'gw1'" in again.stderr \
        and "Traceback" not in again.stderr


def test_a_load_balancer_runs_on_a_node_with_no_gateway(store_node, request):
    the_lab, node, store, _ = store_node
    with open_store(store) as s:
        s.put(NLB_KEY, lab.nlb_config(the_lab.cfg).to_dict())
    for name in lab.TARGET_ROLES:
        the_lab.start_server(name)
    request.addfinalizer(the_lab.stop_servers)
    wait_for("every target healthy", lambda: set(the_lab.target_states().values())
             == {"healthy"} and len(the_lab.target_states()) == len(lab.TARGET_IPS))
    assert agent_nat(node).get("gateways") == []
    v0 = the_lab.counters()
    answers = [curl(the_lab.inet, f"http://{lab.VIP}/") for _ in range(6)]
    assert all(answers), f"the VIP did not answer every request: {answers}"
    served = {a.split()[0] for a in answers}
    assert served <= set(lab.TARGET_ROLES) and len(served) >= 2, served
    v1 = the_lab.counters()
    assert v1.get("TX_NLB_IN", 0) - v0.get("TX_NLB_IN", 0) >= 6 * 3   # SYN, ACK, GET ...


def test_node_up_again_keeps_the_loaded_data_path(store_node):
    """A second node up replaces the agent and compiles nothing: the pins are reused."""
    the_lab, node, store, _ = store_node
    pins = lab.topology(the_lab.cfg)["node"]["pin_root"]
    before = os.stat(os.path.join(pins, node)).st_ino
    up = hpctl("node", "up", "--node", node, "--netns", the_lab.node,
               *(a for i in lab.NODE_IFNAMES for a in ("--if", i)), "--store", store)
    assert up.returncode == 0, up.stderr
    assert os.stat(os.path.join(pins, node)).st_ino == before
    log = open(os.path.join("/run/hyperplane/nodes", f"{node}.agent.log")).read()
    assert log.count("loading the data path of node") == 1, "the data path was loaded again"
