"""Garbage collection over every flow table, on stand-in maps (no BPF needed), and what it
adds to user_ends (the confirmed open flows it deletes, per resource)."""
import ctypes

import pytest

from hyperplane.datapath import flows
from hyperplane.datapath.flows import FLOW_F_PENDING, NSEC, RESV_GRACE_S, collect_garbage
from hyperplane.datapath.loader import Sizes
from hyperplane.datapath.settings import Timeouts
from hyperplane.datapath.verdicts import FlowKind, TcpState

NOW = 10**15
UDP_S = Timeouts().udp


class Key(ctypes.Structure):
    _fields_ = [("src_ip", ctypes.c_uint32), ("proto", ctypes.c_uint8)]


class ResvKey(ctypes.Structure):
    """A reservation's key: src_ip names it in the tests; the NAT IP and port it holds."""
    _fields_ = [("src_ip", ctypes.c_uint32), ("proto", ctypes.c_uint8),
                ("nat_ip", ctypes.c_uint32), ("nat_port", ctypes.c_uint16)]


class Value(ctypes.Structure):
    _fields_ = [("twin", Key), ("orig", Key), ("kind", ctypes.c_uint8),
                ("tcp_state", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("resource", ctypes.c_uint16), ("last_seen_ns", ctypes.c_uint64),
                ("taken_ns", ctypes.c_uint64), ("new_src_ip", ctypes.c_uint32),
                ("new_src_port", ctypes.c_uint16)]


NAT_PORT = 7    # every stand-in flow's translated port (its NAT IP: its own key's ip)


class Table:
    Key, Leaf = Key, Value

    def __init__(self):
        self.entries = {}

    def put(self, k, v):
        self.entries[bytes(k)] = (k, v)

    def items_lookup_batch(self):
        return iter(list(self.entries.values()))

    def pop(self, k, default=None):
        return self.entries.pop(bytes(k), default)


class Array:
    """A u64 array map (user_ends): Key, Leaf, [i], max_entries."""
    Key = Leaf = ctypes.c_uint64

    def __init__(self, n):
        self.max_entries, self.values = n, [0] * n

    def __getitem__(self, k):
        return ctypes.c_uint64(self.values[k.value])

    def __setitem__(self, k, v):
        self.values[k.value] = v.value


class Maps:
    # a node whose gateway count is not the header's default: user_ends' listener slots
    # start at 4, not at bpf/consts.h's 16
    sizes = Sizes(max_gateways=4, max_listeners=8)

    def __init__(self):
        self.tables = {name: Table() for name in (*flows.flow_tables(), "nat_resv")}
        self.user_ends = Array(self.sizes.max_gateways + self.sizes.max_listeners)
        self.config = {0: type("Cfg", (), {"timeout_s": Timeouts().by_index()})()}

    def table(self, name):
        if name == "config":
            return type("T", (), {"Key": staticmethod(int), "__getitem__":
                                  lambda s, k: self.config[k]})()
        if name == "user_ends":
            return self.user_ends
        return self.tables[name]

    def flow(self, table, ip, idle_s, twin_idle_s=None, *, kinds=(FlowKind.NAT_OUT,
             FlowKind.NAT_IN), proto=17, state=TcpState.NONE, resource=0):
        """A flow's two entries (ip and ip+1000), unconfirmed in any table but `flows`;
        returns the original key."""
        k, t = Key(ip, proto), Key(ip + 1000, proto)
        flags = 0 if table == "flows" else FLOW_F_PENDING
        for key, twin, kind, idle in ((k, t, kinds[0], idle_s),
                                      (t, k, kinds[1], idle_s if twin_idle_s is None else
                                       twin_idle_s)):
            self.tables[table].put(key, Value(twin=twin, kind=kind, tcp_state=state,
                                              flags=flags, resource=resource,
                                              last_seen_ns=NOW - int(idle * NSEC),
                                              new_src_ip=key.src_ip, new_src_port=NAT_PORT))
        return k

    def reservation(self, ip, orig, age_s, port=NAT_PORT):
        """Reservation `ip` of (orig's NAT IP, port), naming flow orig."""
        self.tables["nat_resv"].put(ResvKey(ip, 17, orig.src_ip, port),
                                    Value(orig=orig, taken_ns=NOW - int(age_s * NSEC)))


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(flows, "now_ns", lambda: NOW)


def test_gc_sweeps_every_flow_table_and_keeps_ports_of_live_flows_anywhere():
    assert len(flows.flow_tables()) >= 1
    second = flows.flow_tables()[-1]  # e.g. the unconfirmed flows, where maps.h has them
    m = Maps()
    old = RESV_GRACE_S + 1
    live = m.flow("flows", 1, idle_s=1)
    gone = m.flow("flows", 2, idle_s=UDP_S + 5)
    m.flow("flows", 3, idle_s=UDP_S + 5, twin_idle_s=1)      # one direction alive: both stay
    m.flow(second, 4, idle_s=UDP_S + 5)
    young = m.flow(second, 5, idle_s=1)
    m.reservation(100, live, old)
    m.reservation(101, gone, old)
    m.reservation(102, young, old)                            # its flow lives in `second`
    m.reservation(103, Key(9, 17), RESV_GRACE_S / 2)          # within the grace
    m.reservation(104, Key(9, 17), old)                       # its flow is nowhere
    m.reservation(105, live, old, port=NAT_PORT + 1)          # its flow has another port
    res = collect_garbage(m)
    left = {t: sorted(k.src_ip for k, _ in m.tables[t].entries.values()) for t in m.tables}
    assert sorted(ip for t in flows.flow_tables() for ip in left[t]) == \
        [1, 3, 5, 1001, 1003, 1005]
    assert 5 in left[second] and 1005 in left[second]
    assert left["nat_resv"] == [100, 102, 103]
    assert (res.flows_removed, res.reservations_removed) == (4, 3)


def test_gc_counts_the_open_confirmed_flows_it_deletes_per_resource():
    """Each expired confirmed flow that is not CLOSED adds one to its resource's user_ends
    slot (gateways from USER_ENDS_NAT_BASE, listeners after the node's max_gateways), counted
    once (by its original entry); unconfirmed and closed flows add nothing (the data path
    never counted the first as active and counted the close of the second itself)."""
    m = Maps()
    pending = [t for t in flows.flow_tables() if t != "flows"]
    old = Timeouts().tcp_established + 10
    nlb = (FlowKind.NLB_IN, FlowKind.NLB_OUT)
    m.flow("flows", 1, idle_s=UDP_S + 5, resource=2)                              # counts
    m.flow("flows", 2, idle_s=old, proto=6, state=TcpState.ESTABLISHED, resource=2)  # counts
    m.flow("flows", 3, idle_s=old, proto=6, state=TcpState.CLOSED, resource=2)     # closed
    m.flow("flows", 4, idle_s=1, resource=2)                                       # live
    m.flow("flows", 5, idle_s=old, proto=6, state=TcpState.FIN_WAIT, kinds=nlb,
           resource=3)                                                             # counts
    for n, table in enumerate(pending):
        m.flow(table, 10 + n, idle_s=UDP_S + 5, resource=2)                        # pending
        m.flow(table, 20 + n, idle_s=old, proto=6, state=TcpState.SYN_SENT, kinds=nlb,
               resource=3)
    res = collect_garbage(m)
    assert res.flows_removed == 2 * (4 + 2 * len(pending))
    ends = m.user_ends.values
    assert ends[2] == 2, "gateway 2: two open confirmed flows deleted"
    assert ends[m.sizes.max_gateways + 3] == 1, "listener 3: one (its slot follows the gateways)"
    assert sum(ends) == 3


def test_a_key_the_data_path_deleted_first_is_not_counted(monkeypatch):
    """A flow the data path deletes between the GC's read and its delete was counted ended
    by the data path: the GC, which did not delete it, does not count it again."""
    m = Maps()
    m.flow("flows", 1, idle_s=UDP_S + 5)
    k = m.flow("flows", 2, idle_s=UDP_S + 5)
    real = m.tables["flows"].items_lookup_batch

    def read_then_lose_one():
        entries = real()
        m.tables["flows"].entries.pop(bytes(k))   # the data path deletes flow 2's key
        return entries

    monkeypatch.setattr(m.tables["flows"], "items_lookup_batch", read_then_lose_one)
    collect_garbage(m)
    assert m.user_ends.values[0] == 1
