"""The Vagrant lab (vagrant/, hyperplane.lab.vmplan): its VMs hold exactly the namespace
lab's roles, interfaces, MACs and addresses; the provisioning scripts set what the lab's
plan says; `vagrant validate` accepts the Vagrantfile. No root, no VMs."""
import ipaddress
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from hyperplane.errors import ConfigError
from hyperplane.lab import vmplan
from hyperplane.lab.plan import LabConfig, topology

REPO = pathlib.Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
NODE_COUNTS = [1, 2, 3]


def namespace_lab(nodes):
    """The namespace lab's own plan, as `hpctl lab up --nodes N` builds it."""
    return topology(LabConfig(prefix=vmplan.PREFIX, nodes=nodes))


def lab_roles(nodes):
    """The namespace lab's roles the VM lab must hold: every role but the fleet's sync
    bridge (a libvirt network on VMs); the reduced one-node lab leaves out the targets."""
    roles = set(namespace_lab(nodes)["namespaces"]) - {"sync"}
    if nodes == 1:
        roles -= {"t1", "t2", "t3"}
    return roles


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_every_role_is_on_exactly_one_vm(nodes):
    plan = vmplan.vm_plan(nodes)
    placed = [role for vm in plan["vms"] for role in vm["roles"]]
    assert sorted(placed) == sorted(lab_roles(nodes))
    names = {vm["name"] for vm in plan["vms"]}
    node_vms = {n for n in names if n.startswith("node")}
    assert node_vms == {f"node{i}" for i in range(1, nodes + 1)}
    if nodes == 1:
        assert names == {"node1", "edge"}      # the reduced lab: one node, client + internet
    else:
        assert names == {"client", "fabric", "inet"} | node_vms


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_vm_nics_equal_the_namespace_lab_interfaces(nodes):
    """Role, name, MAC and addresses of every NIC are the namespace lab's, and every
    interface of the namespace lab between two roles on VMs is a NIC."""
    lab = namespace_lab(nodes)
    roles = lab_roles(nodes)
    want = {(i["role"], i["ifname"], i["mac"], tuple(i["addresses"]))
            for i in lab["interfaces"]
            if i["role"] in roles and (i["peer"].split("/")[0] in roles or
                                       i.get("kind") == "sync")}
    plan = vmplan.vm_plan(nodes)
    got = [(n["role"], n["ifname"], n["mac"], tuple(n["addresses"]))
           for vm in plan["vms"] for n in vm["nics"]]
    assert len(got) == len(set(got))
    assert set(got) == want
    for vm in plan["vms"]:
        for nic in vm["nics"]:
            assert nic["role"] in vm["roles"]
            assert nic["mac_hex"] == nic["mac"].replace(":", "")
            assert nic["ip"] == nic["addresses"][0].split("/")[0]


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_networks_join_the_two_ends_of_each_link(nodes):
    lab = namespace_lab(nodes)
    plan = vmplan.vm_plan(nodes)
    nic_of = {(n["role"], n["ifname"]): (vm["name"], n) for vm in plan["vms"] for n in vm["nics"]}
    for (role, ifname), (vm, nic) in nic_of.items():
        peer = next(i["peer"] for i in lab["interfaces"]
                    if i["role"] == role and i["ifname"] == ifname)
        peer_role, peer_if = peer.split("/")
        if peer_role == "sync":                      # the fleet's sync bridge: one network
            assert nic["network"] == f"{vmplan.LIBVIRT_PREFIX}-sync"
            continue
        peer_vm, peer_nic = nic_of[(peer_role, peer_if)]
        assert nic["network"] == peer_nic["network"]
        assert peer_vm != vm, "a link inside one VM would never touch a virtio NIC"
        subnet = ipaddress.ip_interface(nic["addresses"][0]).network
        assert all(ipaddress.ip_interface(a).network == subnet for a in peer_nic["addresses"])
    nets = {n["name"]: n for n in plan["networks"]}
    used = {nic["network"] for _, nic in nic_of.values()}
    assert set(nets) == used
    for name, net in nets.items():
        members = sum(1 for _, nic in nic_of.values() if nic["network"] == name)
        assert members == (nodes if name.endswith("-sync") else 2), name
    if nodes > 1:
        assert nets[f"{vmplan.LIBVIRT_PREFIX}-sync"]["mtu"] == lab["sync"]["mtu"]


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_namespaces_inside_vms_are_the_labs(nodes):
    lab = namespace_lab(nodes)
    for vm in vmplan.vm_plan(nodes)["vms"]:
        if len(vm["roles"]) == 1:        # a node, or the fleet's client: its root namespace
            assert vm["namespaces"] == {}
            assert all(n["netns"] is None for n in vm["nics"])
        else:
            assert vm["namespaces"] == {r: lab["namespaces"][r] for r in vm["roles"]}
            assert all(n["netns"] == lab["namespaces"][n["role"]] for n in vm["nics"])


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_scripts_set_the_labs_addresses_routes_and_sysctls(nodes):
    lab = namespace_lab(nodes)
    for vm in vmplan.vm_plan(nodes)["vms"]:
        lines = vm["script"].splitlines()
        subprocess.run(["bash", "-n"], input=vm["script"], text=True, check=True)
        for role in vm["roles"]:
            ns = vm["namespaces"].get(role)
            ip = ["ip", "-n", ns] if ns else ["ip"]
            run = ["ip", "netns", "exec", ns] if ns else []
            for nic in (n for n in vm["nics"] if n["role"] == role):
                for addr in nic["addresses"]:
                    assert " ".join(ip + ["addr", "replace", addr, "dev", nic["ifname"]]) in lines
                assert any(nic["mac"] in line for line in lines)
            for r in lab["routes"][role]:
                assert " ".join(ip + ["route", "replace", r["dst"], "via", r["gateway"]]) in lines
            for key, value in lab["sysctls"][role].items():
                assert " ".join(run + ["sysctl", "-qw", f"{key}={value}"]) in lines
            for nh in lab.get("steering", {}).get(role, {}).get("nexthops", []):
                assert " ".join(ip + ["nexthop", "replace", "id", str(nh["id"]), "via",
                                      nh["via"], "dev", nh["dev"]]) in lines
        node_vm = vm["name"].startswith("node")
        assert any("scripts/setup.sh" in line for line in lines) == node_vm


def test_reduced_lab_node_runs_the_labs_nat_gateway():
    lab = topology(LabConfig(prefix=vmplan.PREFIX))
    gw = lab["gateways"][0]
    script = next(vm for vm in vmplan.vm_plan(1)["vms"] if vm["name"] == "node1")["script"]
    line = next(line for line in script.splitlines() if " nat up " in line)
    words = line.split()
    assert words[words.index("--node") + 1] == lab["node"]["name"]
    assert [words[i + 1] for i, w in enumerate(words) if w == "--if"] == ["in0", "out0"]
    assert [words[i + 1] for i, w in enumerate(words) if w == "--nat-ip"] == gw["nat_ips"]
    assert [words[i + 1] for i, w in enumerate(words) if w == "--inside"] == gw["inside_cidrs"]


@pytest.mark.parametrize("bad", [0, -1, 33, True, "2"])
def test_bad_node_counts_are_refused(bad):
    with pytest.raises(ConfigError):
        vmplan.vm_plan(bad)


def test_cli_refuses_a_bad_node_count_in_one_sentence():
    proc = subprocess.run([sys.executable, "-m", "hyperplane.lab.vmplan", "--json", "--nodes",
                           "two"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "HP_NODES" in proc.stderr
    assert "Traceback" not in proc.stderr


def _vagrant(args, tmp_path, nodes):
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is missing: scripts/setup.sh installs Debian's vagrant and vagrant-libvirt"
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "vagrant.d"), HP_NODES=nodes,
               VAGRANT_DOTFILE_PATH=str(tmp_path / "machines"), VAGRANT_CHECKPOINT_DISABLE="1")
    env.pop("VAGRANT_DEFAULT_PROVIDER", None)
    return subprocess.run([vagrant, *args], cwd=VAGRANT_DIR, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("nodes", ["1", "2"])
def test_vagrant_validate(tmp_path, nodes):
    proc = _vagrant(["validate"], tmp_path, nodes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout


def test_vagrantfile_defines_the_plans_vms(tmp_path):
    """`vagrant status` lists the plan's VMs (nothing is created: no box is needed)."""
    proc = _vagrant(["status", "--machine-readable"], tmp_path, "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = {line.split(",")[1] for line in proc.stdout.splitlines()
              if line.count(",") >= 3 and line.split(",")[2] == "state"}
    assert listed == {vm["name"] for vm in vmplan.vm_plan(2)["vms"]}


def test_vagrantfile_refuses_a_bad_node_count(tmp_path):
    proc = _vagrant(["validate"], tmp_path, "many")
    assert proc.returncode != 0
    assert "HP_NODES must be a whole number" in proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["build-box", "prepare", "selftest"])
def test_vagrant_scripts_are_strict_bash(script):
    path = VAGRANT_DIR / script
    text = path.read_text()
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert "set -euo pipefail" in text
    assert "/work/main" not in text, "scripts must work from any clone"
    subprocess.run(["bash", "-n", str(path)], check=True)
