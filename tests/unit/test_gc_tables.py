"""Garbage collection over every flow table, on stand-in maps (no BPF needed)."""
import ctypes

import pytest

from hyperplane import flows
from hyperplane.flows import NSEC, RESV_GRACE_S, collect_garbage
from hyperplane.settings import Timeouts
from hyperplane.verdicts import FlowKind, TcpState

NOW = 10**15
UDP_S = Timeouts().udp


class Key(ctypes.Structure):
    _fields_ = [("src_ip", ctypes.c_uint32), ("proto", ctypes.c_uint8)]


class Value(ctypes.Structure):
    _fields_ = [("twin", Key), ("orig", Key), ("kind", ctypes.c_uint8),
                ("tcp_state", ctypes.c_uint8), ("last_seen_ns", ctypes.c_uint64),
                ("taken_ns", ctypes.c_uint64)]


class Table:
    Key, Leaf = Key, Value

    def __init__(self):
        self.entries = {}

    def put(self, k, v):
        self.entries[bytes(k)] = (k, v)

    def items_lookup_batch(self):
        return iter(list(self.entries.values()))

    def items_delete_batch(self, keys):
        for k in keys:
            del self.entries[bytes(k)]

    def pop(self, k, default=None):
        return self.entries.pop(bytes(k), default)


class Maps:
    def __init__(self):
        self.tables = {name: Table() for name in (*flows.flow_tables(), "nat_resv")}
        self.config = {0: type("Cfg", (), {"timeout_s": Timeouts().by_index()})()}

    def table(self, name):
        if name == "config":
            return type("T", (), {"Key": staticmethod(int), "__getitem__":
                                  lambda s, k: self.config[k]})()
        return self.tables[name]

    def flow(self, table, ip, idle_s, twin_idle_s=None):
        """A UDP flow's two entries (ip and ip+1000); returns the original key."""
        k, t = Key(ip, 17), Key(ip + 1000, 17)
        for key, twin, idle in ((k, t, idle_s), (t, k, idle_s if twin_idle_s is None else
                                                 twin_idle_s)):
            self.tables[table].put(key, Value(twin=twin, kind=FlowKind.NAT_OUT,
                                              tcp_state=TcpState.NONE,
                                              last_seen_ns=NOW - int(idle * NSEC)))
        return k

    def reservation(self, ip, orig, age_s):
        self.tables["nat_resv"].put(Key(ip, 17), Value(orig=orig, taken_ns=NOW - int(age_s * NSEC)))


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
    res = collect_garbage(m)
    left = {t: sorted(k.src_ip for k, _ in m.tables[t].entries.values()) for t in m.tables}
    assert sorted(ip for t in flows.flow_tables() for ip in left[t]) == \
        [1, 3, 5, 1001, 1003, 1005]
    assert 5 in left[second] and 1005 in left[second]
    assert left["nat_resv"] == [100, 102, 103]
    assert (res.flows_removed, res.reservations_removed) == (4, 2)
