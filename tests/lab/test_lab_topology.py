"""The lab itself: what `hpctl lab up` builds matches the plan, teardown is complete and
idempotent, and `hpctl lab exec/status` work. Uses modes kernel and nft (no datapath
needed), so it runs whatever the state of the XDP code."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hyperplane import lab, netns
from hyperplane.errors import ConfigError

from lab_harness import build_lab, lab_prefix

pytestmark = pytest.mark.lab

LAB_CLI = [sys.executable, "-c",
           "import sys; from hpctl.lab import command; "
           "command.main(sys.argv[1:], prog_name='hpctl lab')"]


@pytest.fixture(scope="module")
def kernel_lab(request):
    return build_lab(request, lab.LabConfig(prefix=lab_prefix("k"), mode="kernel"))


def test_status_matches_plan(kernel_lab):
    cfg = kernel_lab.cfg
    st = lab.status(cfg)
    plan = lab.topology(cfg)
    assert st["up"] and st["mode"] == "kernel"
    assert sorted(st["namespaces_present"]) == sorted(plan["namespaces"].values())
    got = {(i["netns"], i["ifname"]): i for i in st["interfaces"]}
    for want in plan["interfaces"]:
        live = got[(want["netns"], want["ifname"])]
        assert live["present"] and live["state"] == "UP"
        assert live["mac"] == want["mac"]
        assert sorted(live["addresses"]) == sorted(want["addresses"])
        assert live["xdp"] is None
    assert st["nft_forward_packets"] == 0
    assert st["node"]["attached"] == {i: None for i in lab.NODE_IFNAMES}
    assert st["vip"] == lab.VIP and [t["ip"] for t in st["targets"]] == lab.TARGET_IPS
    assert all(t["present"] for t in st["targets"]) and not st["nlb"]["enabled"]


def test_default_offloads_everywhere(kernel_lab):
    """The lab keeps what a veth has by default: segmentation and checksum offloads on."""
    for ifc in lab.topology(kernel_lab.cfg)["interfaces"]:
        feats = netns.offloads(ifc["netns"], ifc["ifname"])
        for f in ("generic-segmentation-offload", "tcp-segmentation-offload",
                  "tx-checksumming"):
            assert feats[f] is True, f"{f} is off for {ifc['netns']}/{ifc['ifname']}"


def test_sysctls_and_neighbours_learned_by_arp(kernel_lab):
    ns = lab.namespaces(kernel_lab.cfg)
    assert netns.read_sysctl(ns["node"], "net.ipv4.ip_forward") == "1"
    for name in ns.values():
        assert netns.read_sysctl(name, "net.ipv6.conf.all.disable_ipv6") == "1"
    r = netns.run_in(kernel_lab.client, ["ping", "-c", "1", "-W", "2", lab.INET_IPS[0]],
                     check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ns.values():           # 128 = NUD_PERMANENT: nothing is written statically
        assert all(n["state"] != 128 for n in netns.neighbours(name)), name
    learned = {n["dst"] for n in netns.neighbours(ns["node"])}
    assert {lab.CLIENT_IPS[0], lab.INET_IPS[0]} <= learned


def _routes(ns):
    with netns.ipr(ns) as ip:
        return {f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ip.get_routes(family=2)
                if r.get_attr("RTA_DST")}


def test_route_back_only_in_kernel_mode(kernel_lab, request):
    assert lab.CLIENT_NET in _routes(kernel_lab.inet)
    nft = build_lab(request, lab.LabConfig(prefix=lab_prefix("f"), mode="nft"))
    try:
        assert lab.CLIENT_NET not in _routes(nft.inet)
        out = netns.run_in(nft.node, ["nft", "list", "table", "inet", lab.NFT_TABLE],
                           capture_output=True, text=True).stdout
        assert f"snat ip to {lab.NAT_IP}" in out
    finally:
        lab.down(nft.cfg)


def test_up_twice_is_refused(kernel_lab):
    with pytest.raises(ConfigError, match=r"already up; run hpctl lab down first"):
        lab.up(kernel_lab.cfg)
    assert lab.status(kernel_lab.cfg)["up"]


def test_up_failure_leaves_nothing(monkeypatch):
    cfg = lab.LabConfig(prefix=lab_prefix("e"), mode="nft")

    def broken(ns, ruleset):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(netns, "nft_load", broken)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            lab.up(cfg)
        assert lab.present(cfg.prefix) == []
    finally:
        lab.down(cfg)


def test_down_is_idempotent_and_cleans_half_built_labs():
    cfg = lab.LabConfig(prefix=lab_prefix("h"), mode="kernel")
    try:
        netns.create(lab.namespaces(cfg)["client"])           # a half-built lab
        with pytest.raises(ConfigError):
            lab.up(cfg)
        st = lab.status(cfg)
        assert not st["up"] and st["namespaces_present"] == [f"{cfg.prefix}-client"]
        sleeper = netns.popen_in(lab.namespaces(cfg)["client"], ["sleep", "60"])
        res = lab.down(cfg)
        assert res["removed"] == [f"{cfg.prefix}-client"] and not res["warnings"]
        assert sleeper.wait(5) is not None, "a process in the lab survived down"
        assert lab.down(cfg)["removed"] == []
    finally:
        lab.down(cfg)
    assert lab.present(cfg.prefix) == []


def test_cli_exec_passes_stdio_and_status(kernel_lab):
    p = kernel_lab.cfg.prefix
    r = subprocess.run(LAB_CLI + ["exec", "--prefix", p, "inet", "--", "sh", "-c",
                                  "cat; exit 7"], input="through\n", capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 7 and r.stdout == "through\n", r
    # the command really runs in the client namespace: it sees cl0 and reaches inet
    r = subprocess.run(LAB_CLI + ["exec", "--prefix", p, "client", "--", "cat",
                                  "/proc/net/dev"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r
    names = {l.split(":")[0].strip() for l in r.stdout.splitlines()[2:]}
    assert names == {"lo", "cl0"}, names
    r = subprocess.run(LAB_CLI + ["exec", "--prefix", p, "client", "--", "no-such-cmd-x"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 127
    r = subprocess.run(LAB_CLI + ["status", "--prefix", p, "--json"], capture_output=True,
                       text=True, timeout=30)
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["up"] and st["prefix"] == p


def test_cli_status_of_a_missing_lab():
    r = subprocess.run(LAB_CLI + ["status", "--prefix", lab_prefix("z")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 4 and "not up" in r.stderr and r.stdout == ""
