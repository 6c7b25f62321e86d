"""Python mirrors of the data path's enums.

Keep in sync: bpf/consts.h defines each of these once; tests/unit/test_verdicts.py parses
the header and fails when the two disagree."""
import enum


class Verdict(enum.IntEnum):
    TX_NAT_OUT = 0
    TX_NAT_IN = 1
    TX_NLB_IN = 2
    TX_NLB_OUT = 3
    TX_ICMP_ERROR = 4
    TX_FRAGMENT = 5
    TX_RST = 6
    PASS_NON_IP = 7
    PASS_NO_RESOURCE = 8
    PASS_LOCAL = 9
    PASS_TTL = 10
    PASS_FIB = 11
    DROP_MALFORMED = 12
    DROP_IP_OPTIONS = 13
    DROP_FRAGMENT = 14
    DROP_UNKNOWN_PROTO = 15
    DROP_NO_FLOW = 16
    DROP_PORT_ALLOC = 17
    DROP_TABLE_FULL = 18
    DROP_NO_ROUTE = 19
    DROP_ICMP_UNSUPPORTED = 20
    DROP_NO_TARGET = 21
    DROP_NO_LISTENER = 22
    DROP_TCP_NOT_SYN = 23

    @property
    def action(self) -> str:
        """The XDP action a verdict ends in."""
        if self <= Verdict.TX_RST:
            return "XDP_TX" if self is Verdict.TX_RST else "XDP_REDIRECT"
        return "XDP_PASS" if self <= Verdict.PASS_FIB else "XDP_DROP"


V_MAX = 24


class Stat(enum.IntEnum):
    FLOW_CREATED = 0
    FLOW_CLOSED = 1
    FLOW_EXPIRED = 2
    EVENT_LOST = 3
    RESV_RECLAIMED = 4
    FIB_LOOKUP = 5


class FlowEventType(enum.IntEnum):
    FLOW_CREATED = 1
    FLOW_CLOSED = 2
    FLOW_EXPIRED = 3


class FlowKind(enum.IntEnum):
    NAT_OUT = 1
    NAT_IN = 2
    NLB_IN = 3
    NLB_OUT = 4


class TcpState(enum.IntEnum):
    NONE = 0
    SYN_SENT = 1
    ESTABLISHED = 2
    FIN_WAIT = 3
    CLOSED = 4


class Timeout(enum.IntEnum):
    TCP_ESTABLISHED = 0
    TCP_SYN = 1
    TCP_CLOSING = 2
    UDP = 3
    ICMP = 4


# Prefixes of the C enumerators of each enum in consts.h.
C_PREFIXES = {Verdict: "V_", Stat: "S_", FlowEventType: "EV_", FlowKind: "KIND_",
              TcpState: "TCP_S_", Timeout: "TO_"}
