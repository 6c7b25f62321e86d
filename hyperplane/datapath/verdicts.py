"""The data path's enums and flags, read from the C (bpf/consts.h, bpf/structs.h, bpf/nlb.h).

Each is defined once, in C; the classes here are built from the headers at import (see
hyperplane/datapath/cheaders.py), so a verdict, stat or state added in C appears here by itself.
tests/unit/test_verdicts.py checks the reading against the headers and that every enum of
consts.h has its class."""
import enum
import re

from hyperplane.datapath import cheaders


def _members(c_enum: str, prefix: str) -> dict[str, int]:
    """The enumerators of `enum c_enum` without their prefix and without a *_MAX sentinel."""
    values = cheaders.enum("consts.h", c_enum)
    bad = [n for n in values if not n.startswith(prefix)]
    if bad:
        raise cheaders.HeaderError(f"enum {c_enum}: {bad} lack the prefix {prefix}")
    return {n[len(prefix):]: v for n, v in values.items() if n != f"{prefix}MAX"}


class Verdict(enum.IntEnum):
    """Where a packet ended (enum hp_verdict); every packet ends in exactly one."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_verdict", "V_").items():
        members[name] = value

    @property
    def action(self) -> str:
        """The XDP action a verdict ends in (the C's main function maps verdicts by range:
        up to V_LAST_TX the packet is sent, up to V_LAST_PASS it goes to the kernel)."""
        if self <= LAST_TX:
            return "XDP_TX" if self.name in BOUNCED else "XDP_REDIRECT"
        return "XDP_PASS" if self <= LAST_PASS else "XDP_DROP"


V_MAX = cheaders.enum("consts.h", "hp_verdict")["V_MAX"]


def _last(define: str, prefix: str) -> Verdict:
    """V_LAST_TX / V_LAST_PASS of consts.h, or (a header without them) the last verdict
    whose name has the prefix."""
    text = cheaders.header_text("consts.h")
    m = re.search(rf"^[ \t]*#[ \t]*define[ \t]+{define}[ \t]+V_(\w+)", text, re.M)
    if m:
        return Verdict[m.group(1)]
    return max(v for v in Verdict if v.name.startswith(prefix))


LAST_TX, LAST_PASS = _last("V_LAST_TX", "TX_"), _last("V_LAST_PASS", "PASS_")

# TX verdicts whose packet is bounced back out of the interface it came in on (XDP_TX)
# rather than redirected: the C sets the action per packet, consts.h says "(bounced)" in
# their comments (a unit test checks this set against those comments).
BOUNCED = frozenset({"TX_RST", "TX_TIME_EXCEEDED", "TX_FRAG_NEEDED"})


class Stat(enum.IntEnum):
    """Counted events that are not verdicts (enum hp_stat)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_stat", "S_").items():
        members[name] = value


class FlowEventType(enum.IntEnum):
    """Ring buffer events (enum hp_event_type)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_event_type", "EV_").items():
        members[name] = value


class FlowKind(enum.IntEnum):
    """What a flow entry is for (enum hp_flow_kind)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_flow_kind", "KIND_").items():
        members[name] = value


class TcpState(enum.IntEnum):
    """TCP state of a flow (enum hp_tcp_state)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_tcp_state", "TCP_S_").items():
        members[name] = value


class Timeout(enum.IntEnum):
    """Indexes into hp_config.timeout_s (enum hp_timeout)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in _members("hp_timeout", "TO_").items():
        members[name] = value


class ConfigFlag(enum.IntFlag):
    """hp_config.flags (HP_F_* of bpf/structs.h)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in cheaders.defines("structs.h", "HP_F_").items():
        members[name[len("HP_F_"):]] = value


class TargetFlag(enum.IntFlag):
    """target_value.flags (TARGET_F_* of bpf/structs.h)."""
    _ignore_ = "members name value"
    members = vars()
    for name, value in cheaders.defines("structs.h", "TARGET_F_").items():
        members[name[len("TARGET_F_"):]] = value


MAGLEV_EMPTY = cheaders.define("nlb.h", "MAGLEV_EMPTY")   # a Maglev slot with no target

# Each class and the C enum it is read from, with the enumerators' prefix.
C_ENUMS = {Verdict: ("hp_verdict", "V_"), Stat: ("hp_stat", "S_"),
           FlowEventType: ("hp_event_type", "EV_"), FlowKind: ("hp_flow_kind", "KIND_"),
           TcpState: ("hp_tcp_state", "TCP_S_"), Timeout: ("hp_timeout", "TO_")}
C_PREFIXES = {cls: prefix for cls, (_, prefix) in C_ENUMS.items()}
