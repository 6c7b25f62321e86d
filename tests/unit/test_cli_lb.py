"""hpctl lb edits the store, validated as a whole and against the nodes running here; bad
input and damaged files exit 2 with one sentence; `lb health` says how old the agent's
view is and never shows a dead agent's "healthy"."""
import json
import os
import socket
import subprocess
import time
from dataclasses import asdict

import pytest

from fleet_store import wipe
from hpctl.main import main
from hyperplane.fleet.store import NLB_KEY, open_store
from hyperplane.node import lifecycle as node_mod
from hyperplane.datapath.loader import Sizes


def hpctl(capsys, store, *args):
    with pytest.raises(SystemExit) as exc:
        main(_with_store(args, store))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _with_store(args, store):
    # --store goes after the (sub)command words, before the arguments
    return [*args, "--store", store]


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store.json")


def test_build_a_load_balancer(capsys, store):
    assert hpctl(capsys, store, "lb", "create", "web-nlb")[0] == 0
    assert hpctl(capsys, store, "lb", "tg", "create", "web", "--interval", "5")[0] == 0
    assert hpctl(capsys, store, "lb", "listener", "add", "--lb", "web-nlb", "--vip",
                 "198.18.0.200", "--port", "80", "--tg", "web")[0] == 0
    assert hpctl(capsys, store, "lb", "register", "--tg", "web", "10.20.1.10:8080",
                 "10.20.2.10:8080@3")[0] == 0
    assert hpctl(capsys, store, "lb", "deregister", "--tg", "web", "10.20.1.10:8080")[0] == 0
    code, out, _ = hpctl(capsys, store, "lb", "show", "--json")
    assert code == 0
    cfg = json.loads(out)
    targets = {f"{t['ip']}:{t['port']}": t for t in cfg["target_groups"][0]["targets"]}
    assert targets["10.20.1.10:8080"]["state"] == "draining"
    assert targets["10.20.2.10:8080"]["weight"] == 3
    assert cfg["listeners"][0]["protocol"] == "TCP"


def test_lb_drives_an_etcd_store(capsys, etcd_server):
    """--store takes a URL: the same commands on etcd, the config under its one key."""
    wipe(etcd_server)   # the session's etcd: start from no keys
    url = etcd_server.url
    assert hpctl(capsys, url, "lb", "create", "web-nlb")[0] == 0
    assert hpctl(capsys, url, "lb", "tg", "create", "web", "--interval", "5")[0] == 0
    assert hpctl(capsys, url, "lb", "register", "--tg", "web", "10.20.1.10:8080")[0] == 0
    code, out, _ = hpctl(capsys, url, "lb", "show", "--json")
    assert code == 0 and json.loads(out) == open_store(url).get(NLB_KEY).value
    assert json.loads(out)["target_groups"][0]["targets"][0]["ip"] == "10.20.1.10"
    assert hpctl(capsys, url, "lb", "delete", "web-nlb")[0] == 0
    assert open_store(url).get(NLB_KEY).value["load_balancers"] == []


def test_an_unreachable_store_is_one_sentence_and_exit_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"etcd://127.0.0.1:{s.getsockname()[1]}"   # nothing listens there
    code, _, err = hpctl(capsys, url, "lb", "show")
    assert code == 2 and url in err and "is etcd running" in err and one_sentence(err), err


@pytest.mark.parametrize("args,message", [
    (("lb", "listener", "add", "--lb", "nope", "--vip", "198.18.0.200", "--port", "80",
      "--tg", "web"), "no load balancer 'nope'"),
    (("lb", "tg", "create", "web", "--interval", "1"), "interval"),
    (("lb", "register", "--tg", "missing", "10.0.0.1:80"), "no target group"),
    (("lb", "tg", "create", "web", "--interval", "5", "--hc-port", "0"),
     "health check port must be 1-65535"),
])
def test_bad_changes_are_refused_and_change_nothing(capsys, store, args, message):
    hpctl(capsys, store, "lb", "create", "web-nlb")
    before = open(store).read()
    code, _, err = hpctl(capsys, store, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert open(store).read() == before


# --- fail safe: damaged stores, what nodes here hold, the agent's view ---------------------

@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """NODE_STATE_DIR in tmp_path; returns a function that writes node n1's state."""
    monkeypatch.setattr(node_mod, "NODE_STATE_DIR", str(tmp_path / "nodes"))
    os.makedirs(tmp_path / "nodes")

    def write(**sizes):
        node_mod.write_state_file(node_mod.state_path("n1"), {
            "node": "n1", "netns": None, "ifnames": ["out0"], "mode": "generic",
            "pin_dir": "/nonexistent", "sizes": asdict(Sizes(**sizes)), "timeouts": {},
            "gateways": [{"name": "gw", "gw_id": 0, "nat_ips": ["198.18.0.100"],
                          "inside_cidrs": ["10.10.0.0/24"]}]})
    return write


def one_sentence(err):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in err


@pytest.mark.parametrize("content", [b'{"load_balancers": [{"na', b"\xff\xfe\xfd", b"",
                                     b"[]", b"garbage"])
@pytest.mark.parametrize("args", [("lb", "show"), ("lb", "create", "web-nlb"),
                                  ("lb", "register", "--tg", "web", "10.0.0.1:80")])
def test_a_damaged_store_is_one_sentence_and_exit_2(capsys, store, content, args):
    with open(store, "wb") as f:
        f.write(content)
    code, _, err = hpctl(capsys, store, *args)
    assert code == 2 and store in err and one_sentence(err), err
    assert open(store, "rb").read() == content


def test_integer_addresses_in_the_store_are_refused(capsys, store):
    open_store(store).put(NLB_KEY, {"target_groups": [{"name": "web", "targets": [
        {"ip": 167772161, "port": 80}]}]})
    code, _, err = hpctl(capsys, store, "lb", "show")
    assert code == 2 and "ip must be an IPv4 address" in err


def test_the_same_target_twice_in_one_registration_is_refused(capsys, store):
    hpctl(capsys, store, "lb", "tg", "create", "web", "--interval", "5")
    before = open(store).read()
    code, _, err = hpctl(capsys, store, "lb", "register", "--tg", "web", "10.0.0.1:80",
                         "10.0.0.1:80@3")
    assert code == 2 and "10.0.0.1:80 is given twice" in err
    assert open(store).read() == before


def _lb_with_listener(capsys, store, vip="198.18.0.200", port="80"):
    assert hpctl(capsys, store, "lb", "create", "web-nlb")[0] == 0
    assert hpctl(capsys, store, "lb", "tg", "create", "web", "--interval", "5")[0] == 0
    return hpctl(capsys, store, "lb", "listener", "add", "--lb", "web-nlb", "--vip", vip,
                 "--port", port, "--tg", "web")


def test_a_vip_equal_to_a_nat_ip_of_a_node_here_is_refused(capsys, store, nodes):
    nodes()
    code, _, err = _lb_with_listener(capsys, store, vip="198.18.0.100")
    assert code == 2 and "node n1" in err and "the VIP is a NAT IP" in err, err


def test_what_a_node_here_cannot_hold_is_refused_and_removals_are_not(capsys, store, nodes):
    nodes(max_lbs=2, max_listeners=2, max_targets=2)
    code, _, err = hpctl(capsys, store, "lb", "create", "big", "--id", "2")
    assert code == 2 and "lb_id 2 is beyond this node's 2 load balancer slots" in err, err
    assert _lb_with_listener(capsys, store)[0] == 0
    code, _, err = hpctl(capsys, store, "lb", "listener", "add", "--lb", "web-nlb", "--vip",
                         "198.18.0.200", "--port", "53", "--protocol", "TCP_UDP", "--tg", "web")
    assert code == 2 and "need 3 listener slots" in err, err
    code, _, err = hpctl(capsys, store, "lb", "register", "--tg", "web", "10.0.0.1:80",
                         "10.0.0.2:80", "10.0.0.3:80")
    assert code == 2 and "3 targets are registered; this node holds at most 2" in err, err
    nodes(max_lbs=2, max_listeners=1)        # the node shrank: removing must still work
    assert hpctl(capsys, store, "lb", "listener", "delete", "--vip", "198.18.0.200",
                 "--port", "80")[0] == 0


def _status(nodes_dir, **fields):
    status = {"node": "n1", "pid": os.getpid(), "time": time.time() - 42,
              "config_error": None, "flows_reset_unhealthy": 0,
              "target_groups": {"web": {"10.0.0.1:80": {"state": "healthy", "slot": 0,
                                                        "active_flows": 1, "packets": 5}}},
              **fields}
    node_mod.write_state_file(node_mod.state_path("n1", ".agent.json"), status)


def health(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["lb", "health", "--node", "n1", *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return exc.value.code, out.out, out.err


def test_health_of_a_running_agent_shows_its_age(capsys, nodes):
    _status(nodes)
    code, out, err = health(capsys)
    assert code == 0 and "healthy" in out and "running, status 42" in err, (out, err)
    code, out, _ = health(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and data["running"] and 41 <= data["age_s"] <= 60


def test_health_of_a_dead_agent_is_not_a_stale_healthy(capsys, nodes):
    dead = subprocess_pid_that_exited()
    _status(nodes, pid=dead)
    code, out, err = health(capsys)
    assert code == 1 and "healthy" not in out and "unknown" in out, out
    assert "not running" in err and "42 s old" in err, err
    code, out, _ = health(capsys, "--json")
    assert code == 1 and json.loads(out)["running"] is False


def test_health_shows_the_store_the_agent_rejected(capsys, nodes):
    _status(nodes, config_error="Listener 1.2.3.4:1: there is no load balancer 'nope'.")
    code, _, err = health(capsys)
    assert code == 1 and "rejected the store" in err and "no load balancer 'nope'" in err


@pytest.mark.parametrize("content", [b"", b"\xff", b"{", b"[]", b'{"node": "n1"}',
                                     b'{"node": "n1", "pid": 1, "time": 1, '
                                     b'"target_groups": {"web": {"a": {}}}}'])
def test_a_damaged_agent_status_is_one_sentence_and_exit_2(capsys, nodes, content):
    with open(node_mod.state_path("n1", ".agent.json"), "wb") as f:
        f.write(content)
    code, _, err = health(capsys)
    assert code == 2 and "agent status of node 'n1' is damaged" in err and one_sentence(err)


def subprocess_pid_that_exited() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_agent_tick_of_zero_is_refused(capsys, nodes):
    nodes()
    with pytest.raises(SystemExit) as exc:
        main(["agent", "run", "--node", "n1", "--tick", "0"])
    assert exc.value.code == 2 and "--tick" in capsys.readouterr().err
