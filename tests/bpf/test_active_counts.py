"""ActiveConnectionCount / ActiveFlowCount are counters (issue 6 section 7): the data path
counts confirmed and ended flows per resource, user space adds the open confirmed flows it
deletes (GC, reset on unhealthy, a removed target) to user_ends, and the metrics are read
without touching the flow tables."""
from __future__ import annotations

from dataclasses import replace

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT, INET, MAC, NAT_IP, SIZES, TARGET_MAC, TARGETS, VIP, Env
from hyperplane.datapath.flows import collect_garbage, flow_tables, user_ends_bases
from hyperplane.observe.metrics import gateway_metrics, load_balancer_metrics
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.verdicts import FlowKind, Verdict
from packets import from_client, from_inet, tcp_syn


def nlb_config(targets=TARGETS) -> NlbConfig:
    return NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}],
        "listeners": [{"lb": "lb", "vip": VIP, "port": 80, "protocol": "TCP",
                       "target_group": "web"}],
        "target_groups": [{"name": "web", "targets": [{"ip": t, "port": 8080}
                                                      for t in targets]}]})


def nat_flow(e, cport: int, *, confirm: bool = True) -> int:
    """A NAT TCP connection from the client: SYN, and with confirm the SYN-ACK and the
    client's ACK that ends the handshake (and confirms the flow). Returns its NAT port."""
    verdict, _, out = e.run(tcp_syn(sport=cport))       # seq 1000
    assert verdict == Verdict.TX_NAT_OUT
    port = Ether(out)[TCP].sport
    if confirm:
        synack = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA",
                                                          seq=500, ack=1001))
        assert e.run(synack, "out0")[0] == Verdict.TX_NAT_IN
        ack = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=cport, dport=80, flags="A",
                                                         seq=1001, ack=501))
        assert e.run(ack)[0] == Verdict.TX_NAT_OUT
    return port


def nlb_flow(e, sport: int, *, confirm: bool = True) -> str:
    """An NLB TCP connection: the client's SYN and, with confirm, the target's SYN-ACK and
    the client's ACK. Returns its target."""
    syn = from_inet(IP(src=INET, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=10))
    verdict, _, out = e.run(syn, "out0")
    assert verdict == Verdict.TX_NLB_IN
    target = Ether(out)[IP].dst
    if confirm:
        synack = Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=target, dst=INET) / \
            TCP(sport=8080, dport=sport, flags="SA", seq=99, ack=11)
        assert e.run(synack, "tg0")[0] == Verdict.TX_NLB_OUT
        ack = from_inet(IP(src=INET, dst=VIP) / TCP(sport=sport, dport=80, flags="A", seq=11,
                                                    ack=100))
        assert e.run(ack, "out0")[0] == Verdict.TX_NLB_IN
    return target


def age_every_flow(dp) -> None:
    """Every flow entry idle since the clock began: expired for the GC."""
    for name in flow_tables():
        table = dp.table(name)
        for k, v in list(table.items()):
            v.last_seen_ns = 1
            table[k] = v


def user_ends(dp, slot: int) -> int:
    table = dp.table("user_ends")
    return table[table.Key(slot)].value


def test_gc_of_expired_confirmed_flows_lowers_active_connections(e):
    """Confirmed flows count until deleted; the GC's deletion of open ones is counted in
    user_ends (one per flow), a closed flow's end was counted by the data path already and
    an unconfirmed flow never counted."""
    nat_flow(e, 41000)
    nat_flow(e, 41001)
    nat_flow(e, 41002, confirm=False)                       # a SYN alone: not active
    port = nat_flow(e, 41005, confirm=False)                # SYN-ACK seen, no ACK yet
    synack = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA"))
    assert e.run(synack, "out0")[0] == Verdict.TX_NAT_IN
    closed = nat_flow(e, 41003)
    rst = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=closed, flags="R", seq=501))
    assert e.run(rst, "out0")[0] == Verdict.TX_NAT_IN
    assert e.gw_metrics()["ActiveConnectionCount"] == 2
    age_every_flow(e.dp)
    assert e.gw_metrics()["ActiveConnectionCount"] == 2, "an expired flow counts until deleted"
    assert collect_garbage(e.dp).flows_removed == 10
    assert user_ends(e.dp, user_ends_bases(e.dp)["nat"] + 0) == 2
    assert e.gw_metrics()["ActiveConnectionCount"] == 0
    nat_flow(e, 41004)
    assert e.gw_metrics()["ActiveConnectionCount"] == 1


def test_a_flow_the_data_path_deletes_first_is_counted_once(e, monkeypatch):
    """An expired flow met by a packet between the GC's read and its delete is deleted (and
    counted ended) by the data path; the GC, whose delete finds it gone, does not count it
    again."""
    from hyperplane.datapath import flows
    nat_flow(e, 41100)
    age_every_flow(e.dp)
    real, sent = flows.delete_flow_entries, []

    def packet_first(dp, name, entries):
        if not sent:  # the client's new SYN meets the expired flow: the C deletes it
            sent.append(e.run(tcp_syn(sport=41100))[0])
        return real(dp, name, entries)

    monkeypatch.setattr(flows, "delete_flow_entries", packet_first)
    assert collect_garbage(e.dp).flows_removed == 0
    assert sent == [Verdict.TX_NAT_OUT]
    assert user_ends(e.dp, 0) == 0
    # the old flow ended in the data path; the new one is unconfirmed
    assert e.gw_metrics()["ActiveConnectionCount"] == 0
    assert sum(c.flows_ended for c in e.dp.table("gw_stats")[0]) == 1


def test_reset_and_removed_targets_lower_active_flows(e):
    """Reset on unhealthy (delete_flows_of) and a target leaving the config delete its flows:
    ActiveFlowCount drops by its open confirmed flows, in either table."""
    plane = NlbDataplane(e.dp)
    plane.apply(nlb_config())
    try:
        lid = plane.state.listener_ids[(VIP, 80, 6)]
        chosen = {sport: nlb_flow(e, sport) for sport in range(42000, 42030)}
        per_target = {t: sum(1 for c in chosen.values() if c == t) for t in TARGETS}
        assert all(per_target.values()), per_target
        pending_target = nlb_flow(e, 42100, confirm=False)  # unconfirmed: never active
        assert load_balancer_metrics(e.dp)[0]["ActiveFlowCount"] == 30

        first = TARGETS[0]
        deleted = plane.delete_flows_of(plane.target_id(f"{first}:8080"))
        assert deleted == per_target[first] + (pending_target == first)
        assert load_balancer_metrics(e.dp)[0]["ActiveFlowCount"] == 30 - per_target[first]
        assert user_ends(e.dp, user_ends_bases(e.dp)["lb"] + lid) == per_target[first]

        gone = {plane.target_id(f"{t}:8080") for t in (first, TARGETS[2])}
        plane.apply(nlb_config(TARGETS[:2]))                  # the third target goes
        assert load_balancer_metrics(e.dp)[0]["ActiveFlowCount"] == per_target[TARGETS[1]]
        left = [v.target for name in flow_tables() for _, v in e.dp.table(name).items()
                if v.kind in (FlowKind.NLB_IN, FlowKind.NLB_OUT)]
        assert left and not gone & set(left), left
    finally:
        plane.apply(NlbConfig())


class NoFlowTables:
    """The data path's maps, except that any use of a flow table fails the test."""

    def __init__(self, dp):
        self.dp, self.sizes = dp, dp.sizes

    def table(self, name):
        assert name not in flow_tables(), f"metrics read the flow table {name!r}"
        return self.dp.table(name)


def test_metrics_never_read_the_flow_tables(e):
    plane = NlbDataplane(e.dp)
    plane.apply(nlb_config())
    try:
        nat_flow(e, 43000)
        nlb_flow(e, 43001)
        maps = NoFlowTables(e.dp)
        assert gateway_metrics(maps, 0)["ActiveConnectionCount"] == 1
        assert load_balancer_metrics(maps)[0]["ActiveFlowCount"] == 1
    finally:
        plane.apply(NlbConfig())


def test_listener_slots_follow_the_nodes_gateway_count(env):
    """A node built with 4 gateway slots keeps its listeners' user_ends after slot 4 (the
    C's USER_ENDS_LB_BASE is HP_MAX_GATEWAYS), not after the header's default 16."""
    from hyperplane.datapath.loader import Datapath
    from hyperplane.datapath.settings import write_config
    dp = Datapath(replace(SIZES, max_gateways=4), hook=env.hook)
    try:
        write_config(dp)
        run = Env(dp, env.ifindex, env.hook)
        plane = NlbDataplane(dp)
        plane.apply(nlb_config())
        lid = plane.state.listener_ids[(VIP, 80, 6)]
        target = nlb_flow(run, 44000)
        assert load_balancer_metrics(dp)[0]["ActiveFlowCount"] == 1
        plane.delete_flows_of(plane.target_id(f"{target}:8080"))
        assert user_ends(dp, 4 + lid) == 1   # with the header's 16, beyond this node's array
        assert load_balancer_metrics(dp)[0]["ActiveFlowCount"] == 0
    finally:
        dp.close()


def test_batched_delete_tells_its_deletions_from_keys_already_gone(e):
    """BPF_MAP_DELETE_BATCH stops at a key that is gone: the keys before it were deleted by
    the call, that one was not, and the rest are deleted by the next batch."""
    from hyperplane.datapath.flows import _delete
    for cport in range(45000, 45004):
        nat_flow(e, cport, confirm=False)
    table = e.dp.table("pending")
    keys = [k for k, _ in table.items()]
    assert len(keys) == 8
    table.pop(keys[3])
    table.pop(keys[6])
    assert _delete(table, keys) == [True] * 3 + [False] + [True] * 2 + [False, True]
    assert not table.items()


def test_batched_delete_copies_the_keys_once_however_many_are_gone(e, monkeypatch):
    """Each key gone meanwhile costs one more BPF_MAP_DELETE_BATCH call, starting after
    it in the same array. (Copying every remaining key into a new array per gone key was
    quadratic: a restarted fleet agent's stale-flow cleanup, racing the garbage
    collector over ~20,000 keys, kept its sync task busy for minutes.)"""
    from hyperplane.datapath import pinned
    from hyperplane.datapath.flows import _delete
    for cport in range(45100, 45140):
        nat_flow(e, cport, confirm=False)
    table = e.dp.table("pending")
    keys = [k for k, _ in table.items()]
    assert len(keys) == 80
    gone = set(range(0, 80, 4))
    for i in gone:
        table.pop(keys[i])
    calls, real = [], pinned.delete_batch

    def counted(fd, arr, count, start=0):
        calls.append((id(arr), start, count))
        return real(fd, arr, count, start)
    monkeypatch.setattr(pinned, "delete_batch", counted)
    assert _delete(table, keys) == [i not in gone for i in range(80)]
    assert not table.items()
    assert len({a for a, _, _ in calls}) == 1, "the keys were copied into a new array"
    # the first call stops at key 0 (gone), each next one starts after the key the last
    # one stopped at; the last deletes the keys after 76 and ends the work
    assert [s for _, s, _ in calls] == [0] + [i + 1 for i in sorted(gone)]
