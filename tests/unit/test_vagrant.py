"""The Vagrant lab (vagrant/, hyperplane.lab.vmplan and vmstore): its VMs hold exactly the
namespace lab's roles, interfaces, MACs and addresses; the provisioning scripts set what
the lab's plan says and, with 2 or more nodes, start the fleet (etcd on node1's sync
address, the namespace fleet lab's store records, `hpctl node up` on every node);
`vagrant validate` accepts the Vagrantfile. No root, no VMs."""
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
def test_every_vm_may_have_all_its_nics(nodes):
    """vagrant-libvirt refuses a VM with more NICs than its nic_adapter_count (default 8,
    the management NIC included): the fabric VM has 2n + 5 lab NICs."""
    for vm in vmplan.vm_plan(nodes)["vms"]:
        assert vm["nic_adapter_count"] >= len(vm["nics"]) + 1
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert 'lv.nic_adapter_count = vm["nic_adapter_count"]' in vagrantfile


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


# --- the fleet on VMs (HP_NODES >= 2) ----------------------------------------------------

FLEET_NODE_COUNTS = [2, 3, 4]


def _scripts(nodes):
    return {vm["name"]: vm["script"] for vm in vmplan.vm_plan(nodes)["vms"]}


def _line(script, needle):
    """The index and words of the one line holding needle."""
    found = [(i, line) for i, line in enumerate(script.splitlines()) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0][0], found[0][1].split()


def _values(words, option):
    return [words[i + 1] for i, w in enumerate(words) if w == option]


@pytest.mark.parametrize("nodes", FLEET_NODE_COUNTS)
def test_store_is_etcd_on_node1s_sync_address_only(nodes):
    """etcd runs on node1 (a fresh data dir under /var/lib), listening for clients and
    peers on node1's sync0 address of the plan only: never 0.0.0.0, never the management
    NIC; no other VM starts a store."""
    lab = namespace_lab(nodes)
    plan = vmplan.vm_plan(nodes)
    sync = next(i for i in lab["interfaces"] if i["role"] == "node1" and i["ifname"] == "sync0")
    address = sync["addresses"][0].split("/")[0]
    assert address == lab["sync"]["addresses"][1]
    store = plan["store"]
    assert store["vm"] == "node1" and store["address"] == address
    assert store["url"] == f"etcd://{address}:{vmplan.ETCD_CLIENT_PORT}"
    node1 = next(vm for vm in plan["vms"] if vm["name"] == "node1")
    assert any(n["ifname"] == "sync0" and n["ip"] == address for n in node1["nics"])
    scripts = _scripts(nodes)
    _, words = _line(scripts["node1"], "setsid etcd ")
    for option in ("--listen-client-urls", "--advertise-client-urls"):
        assert _values(words, option) == [f"http://{address}:{vmplan.ETCD_CLIENT_PORT}"]
    for option in ("--listen-peer-urls", "--initial-advertise-peer-urls"):
        assert _values(words, option) == [f"http://{address}:{vmplan.ETCD_PEER_PORT}"]
    assert "0.0.0.0" not in scripts["node1"]
    data_dir = _values(words, "--data-dir")[0]
    assert data_dir.startswith(("/var/lib/", "/run/"))
    assert f"rm -rf {data_dir}" in scripts["node1"]
    assert "nohup" in words and "&" in words and "systemctl" not in scripts["node1"]
    for name, script in scripts.items():
        if name != "node1":
            assert "etcd " not in script and "vmstore put" not in script, name


@pytest.mark.parametrize("nodes", FLEET_NODE_COUNTS)
def test_store_gets_the_namespace_fleet_labs_records(nodes):
    """node1's script writes exactly what the namespace fleet lab writes into its store
    (fleet_build.fleet_records: /nat with the plan's gateway, /nlb with its VIP and
    targets), into the plan's store."""
    import json
    from hyperplane.lab.fleet_build import fleet_records
    cfg = LabConfig(prefix=vmplan.PREFIX, nodes=nodes)
    lab = topology(cfg)
    script = _scripts(nodes)["node1"]
    lines = script.splitlines()
    start, words = _line(script, "hyperplane.lab.vmstore put")
    assert words[-1] == "<<'HP_RECORDS'"
    assert words[words.index("put") + 1] == f"etcd://{lab['sync']['addresses'][1]}:2379"
    end = lines.index("HP_RECORDS", start)
    records = json.loads("\n".join(lines[start + 1:end]))
    assert records == json.loads(json.dumps(fleet_records(cfg, lab)))
    assert [g["nat_ips"] for g in records["/nat"]["gateways"]] == \
        [g["nat_ips"] for g in lab["gateways"]]
    assert {listener["vip"] for listener in records["/nlb"]["listeners"]} == {lab["vip"]}
    targets = {t["ip"] for g in records["/nlb"]["target_groups"] for t in g["targets"]}
    assert targets == {t["ip"] for t in lab["targets"]}


@pytest.mark.parametrize("nodes", FLEET_NODE_COUNTS)
def test_every_node_runs_node_up_from_the_store_after_it(nodes):
    """Each node VM: setup.sh, a bounded wait until the store holds the records, then
    `hpctl node up` with the plan's node name, data path interfaces, outside interface,
    sync device and store; on node1 the store (etcd, records) comes before all that.
    The other VMs start nothing of the fleet. The options are hpctl's own (click parses
    them)."""
    from hpctl.node import up_cmd
    lab = namespace_lab(nodes)
    plan = vmplan.vm_plan(nodes)
    url = plan["store"]["url"]
    scripts = _scripts(nodes)
    for n in lab["fleet_nodes"]:
        script = scripts[n["role"]]
        setup, _ = _line(script, "scripts/setup.sh")
        wait, wait_words = _line(script, "hyperplane.lab.vmstore wait")
        up, words = _line(script, " node up ")
        assert setup < wait < up
        assert wait_words[wait_words.index("wait") + 1] == url
        assert set(_values(wait_words, "--key")) == {"/nat", "/nlb"}
        assert float(_values(wait_words, "--timeout")[0]) > 0
        assert _values(words, "--node") == [n["name"]]
        assert _values(words, "--if") == lab["fleet"]["datapath_ifnames"]
        assert _values(words, "--sync-dev") == [lab["fleet"]["sync_dev"]]
        assert _values(words, "--outside-if") == ["out0"]
        assert _values(words, "--store") == [url]
        assert "--netns" not in words      # the root namespace: the real virtio NICs
        ctx = up_cmd.make_context("up", words[words.index("up") + 1:])
        assert ctx.params["start_timeout"] == vmplan.NODE_START_S
        if n["role"] == "node1":
            etcd, _ = _line(script, "setsid etcd ")
            health, _ = _line(script, "|| { echo 'etcd did not answer")
            put, _ = _line(script, "hyperplane.lab.vmstore put")
            assert setup < etcd < health < put < wait
    for name in ("client", "fabric", "inet"):
        assert " node up " not in scripts[name] and "vmstore" not in scripts[name]


def test_reduced_lab_starts_no_store():
    plan = vmplan.vm_plan(1)
    assert plan["store"] is None and plan["fleet_nodes"] == []
    for vm in plan["vms"]:
        assert "etcd" not in vm["script"] and " node up " not in vm["script"]


def test_vmstore_puts_records_and_waits_for_them(tmp_path):
    import json
    from hyperplane.errors import HyperplaneError
    from hyperplane.fleet.store import open_store
    from hyperplane.lab import vmstore
    url = str(tmp_path / "store.json")
    with pytest.raises(HyperplaneError, match="/nat not written yet"):
        vmstore.wait_store(url, ["/nat"], timeout_s=0.05, poll_s=0.01)
    records = vmplan.vm_plan(2)["store"]["records"]
    proc = subprocess.run([sys.executable, "-m", "hyperplane.lab.vmstore", "put", url],
                          input=json.dumps(records), capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    with open_store(url) as store:
        assert {k: store.get(k).value for k in records} == records
    assert vmstore.wait_store(url, ["/nat", "/nlb"], timeout_s=1) >= 0
    bad = subprocess.run([sys.executable, "-m", "hyperplane.lab.vmstore", "put", url],
                         input="[1]", capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
