"""Python's view of the C constants matches the C (bpf/*.h), read here independently.

hyperplane/datapath/verdicts.py builds its enums and flags from the headers (hyperplane/datapath/cheaders.py);
this test reads the same headers with its own simple patterns, and checks the constants
other modules still copy."""
import re
from pathlib import Path

import pytest

from hyperplane.datapath import cheaders
from hyperplane.datapath import verdicts

BPF = Path(__file__).resolve().parents[2] / "bpf"


def raw(header: str) -> str:
    return (BPF / header).read_text()


def c_enum(name: str) -> dict[str, int]:
    """`NAME = <decimal>` enumerators of `enum name` (consts.h spells every value out)."""
    body = re.search(rf"enum\s+{name}\s*\{{(.*?)\}};", raw("consts.h"), re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    names = re.findall(r"\b([A-Z][A-Z0-9_]*)\b\s*(?:=|,)", body)
    values = dict(re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=\s*(\d+)", body))
    assert set(names) == set(values), f"enum {name}: an enumerator without an explicit value"
    return {n: int(v) for n, v in values.items()}


def c_defines(header: str, prefix: str) -> dict[str, int]:
    return {n: int(v, 0) for n, v in
            re.findall(rf"^#define\s+({prefix}\w*)\s+(0x[0-9a-fA-F]+|\d+)\b", raw(header), re.M)}


def test_every_enum_of_consts_h_has_its_python_class():
    c_names = set(re.findall(r"\benum\s+(\w+)\s*\{", raw("consts.h")))
    mirrored = {c_name for c_name, _ in verdicts.C_ENUMS.values()}
    assert c_names == mirrored, f"enums of consts.h without a class in verdicts.py: " \
                                f"{sorted(c_names - mirrored)}"


@pytest.mark.parametrize("enum_cls", list(verdicts.C_ENUMS), ids=lambda c: c.__name__)
def test_python_enum_matches_c(enum_cls):
    c_name, prefix = verdicts.C_ENUMS[enum_cls]
    c = {n[len(prefix):]: v for n, v in c_enum(c_name).items() if n != f"{prefix}MAX"}
    assert c, f"no enumerators found in enum {c_name}"
    assert {m.name: m.value for m in enum_cls} == c


def test_verdicts_index_the_counter_array_without_gaps():
    v_max = c_enum("hp_verdict")["V_MAX"]
    assert verdicts.V_MAX == v_max == len(verdicts.Verdict)
    assert sorted(verdicts.Verdict) == list(range(v_max))
    assert sorted(verdicts.Stat) == list(range(c_enum("hp_stat")["S_MAX"]))


def test_verdict_actions_follow_the_ranges_of_the_c():
    """The C maps a verdict to its action by range (TX_*, then PASS_*, then DROP_*): every
    verdict's name agrees with the range it is in, and the ranges end where consts.h says
    (V_LAST_TX / V_LAST_PASS, when it names them)."""
    for v in verdicts.Verdict:
        want = {"TX": ("XDP_TX", "XDP_REDIRECT"), "PASS": ("XDP_PASS",),
                "DROP": ("XDP_DROP",)}[v.name.split("_")[0]]
        assert v.action in want, (v, v.action)
    last = dict(re.findall(r"^#define\s+V_LAST_(TX|PASS)\s+V_(\w+)", raw("consts.h"), re.M))
    if last:
        assert verdicts.LAST_TX.name == last["TX"] and verdicts.LAST_PASS.name == last["PASS"]
    assert verdicts.Verdict.TX_RST.action == "XDP_TX"
    assert verdicts.Verdict.TX_NAT_OUT.action == "XDP_REDIRECT"


def test_bounced_verdicts_are_those_consts_h_calls_bounced():
    body = re.search(r"enum\s+hp_verdict\s*\{(.*?)\};", raw("consts.h"), re.S).group(1)
    marked = {m.group(1) for m in re.finditer(r"\bV_(TX_\w+)\s*=\s*\d+\s*,\s*/\*(.*?)\*/", body, re.S)
              if "bounced" in m.group(2)}
    tx = {v.name for v in verdicts.Verdict if v.name.startswith("TX_")}
    assert verdicts.BOUNCED & tx == marked


def test_flags_and_maglev_empty_match_c():
    assert {f.name: f.value for f in verdicts.ConfigFlag} == \
        {n[len("HP_F_"):]: v for n, v in c_defines("structs.h", "HP_F_").items()}
    assert {f.name: f.value for f in verdicts.TargetFlag} == \
        {n[len("TARGET_F_"):]: v for n, v in c_defines("structs.h", "TARGET_F_").items()}
    assert verdicts.MAGLEV_EMPTY == c_defines("nlb.h", "MAGLEV_EMPTY")["MAGLEV_EMPTY"]


def test_constants_other_modules_copy_from_c():
    """Copies outside verdicts.py (until they import from it) still equal the C."""
    from hyperplane.datapath import flows
    from hyperplane.nat import gateway as nat
    from hyperplane.nlb import dataplane as nlb
    from hyperplane.datapath import settings
    flags = c_defines("structs.h", "")
    assert verdicts.MAGLEV_EMPTY == c_defines("nlb.h", "MAGLEV_EMPTY")["MAGLEV_EMPTY"]
    assert nlb.MAGLEV_EMPTY is verdicts.MAGLEV_EMPTY
    assert verdicts.TargetFlag.ACTIVE == flags["TARGET_F_ACTIVE"]
    assert flows.FLOW_F_PENDING == flags["FLOW_F_PENDING"]
    assert settings.F_RST_ON_NO_FLOW == flags["HP_F_RST_ON_NO_FLOW"]
    assert nat.MAX_NAT_IPS == c_defines("consts.h", "HP_MAX_NAT_IPS")["HP_MAX_NAT_IPS"]


def test_sizes_defaults_are_the_c_defaults():
    """loader.Sizes passes each size as -DHP_<NAME>; its defaults are consts.h's."""
    from dataclasses import fields

    from hyperplane.datapath.loader import Sizes
    c = c_defines("consts.h", "HP_")
    for f in fields(Sizes):
        assert f"HP_{f.name.upper()}" in c, f"consts.h has no default for HP_{f.name.upper()}"
        assert f.default == c[f"HP_{f.name.upper()}"], f.name


def test_timeout_indexes_are_written_in_c_order():
    from hyperplane.datapath.settings import Timeouts
    t = Timeouts(tcp_established=1, tcp_syn=2, tcp_closing=3, udp=4, icmp=5)
    by_index = t.by_index()
    for name, index in c_enum("hp_timeout").items():
        if name != "TO_MAX":
            assert by_index[index] == getattr(t, name[len("TO_"):].lower())


def test_pinned_map_list_is_every_hp_map_of_maps_h():
    from hyperplane.datapath.loader import Datapath
    from hyperplane.datapath.pinned import pinned_map_names
    text = re.sub(r"/\*.*?\*/", "", raw("maps.h"), flags=re.S)
    declared = re.findall(r"^HP_MAP\([^;]*?,\s*(\w+)\s*,[^,;]*,[^,;]*\);", text, re.M)
    assert list(pinned_map_names()) == declared
    assert set(Datapath.PINNED) == set(declared), \
        "loader's Datapath.PINNED differs from maps.h: use hyperplane.datapath.pinned.pinned_map_names()"


def test_flow_event_layout_follows_the_c_struct():
    """events.py declares struct flow_event (bcc cannot type the ring buffer): its members
    are the C's, in order, with the C's sizes; the record inside is records.py's."""
    import ctypes

    from hyperplane.fleet.records import RECORD_SIZE
    from hyperplane.observe.events import RawFlowEvent
    sizes = {"__u32": 4, "__u64": 8, "struct flow_record": RECORD_SIZE}
    want = [(name, sizes[ctype]) for ctype, name in cheaders.struct_members("structs.h",
                                                                             "flow_event")]
    assert [(n, ctypes.sizeof(t)) for n, t in RawFlowEvent._fields_] == want


def test_user_ends_slots_are_the_cs_with_the_nodes_sizes():
    """USER_ENDS_NAT_BASE / USER_ENDS_LB_BASE as consts.h defines them (read here with a
    simple pattern), evaluated with a node's max_gateways rather than the default."""
    from types import SimpleNamespace

    from hyperplane.datapath import flows
    from hyperplane.datapath.loader import Sizes
    text = raw("consts.h")
    nat = re.search(r"^#define\s+USER_ENDS_NAT_BASE\s+(\w+)", text, re.M).group(1)
    lb = re.search(r"^#define\s+USER_ENDS_LB_BASE\s+(\w+)", text, re.M).group(1)
    sizes = Sizes(max_gateways=5, max_listeners=7)
    names = {"HP_MAX_GATEWAYS": 5, "HP_MAX_LISTENERS": 7}
    want = {k: int(v) if v.isdigit() else names[v] for k, v in (("nat", nat), ("lb", lb))}
    assert flows.user_ends_bases(SimpleNamespace(sizes=sizes)) == want
