"""Which events a fleet node's data path writes (HP_F_PEER_EVENTS, bpf/flow.h emit_event):
hyperplane.observe.events.peer_events_only decides from what the hub's subscribers want."""
import pytest

from hyperplane.datapath.verdicts import FlowEventType as T
from hyperplane.observe.events import peer_events_only

DELETING = {int(T.FLOW_CLOSED), int(T.FLOW_EXPIRED), int(T.FLOW_REMOVED)}


@pytest.mark.parametrize("records, event_types, only", [
    (1, [], True),                          # the fleet member alone
    (1, [DELETING | {int(T.FLOW_REJECTED)}], True),      # ... and flow logs
    (1, [None], False),                     # a follower of every event
    (1, [DELETING, {int(T.FLOW_CREATED)}], False),
    (1, [{int(T.FLOW_CHANGED)}], False),
    (0, [], False),                         # no fleet member: every event, as before
    (0, [DELETING], False),
], ids=["member", "member-flowlogs", "follower", "wants-created", "wants-changed",
        "no-member", "flowlogs-only"])
def test_pending_flow_events_are_skipped_only_when_no_reader_wants_them(records, event_types,
                                                                        only):
    assert peer_events_only(records, event_types) is only


# --- the hub's fan-out of one read -------------------------------------------------------

from hyperplane.datapath import ring  # noqa: E402
from hyperplane.observe import events  # noqa: E402


class _Reads:
    """An EventRing stand-in: hands out the batches it was given, then empty ones."""
    fd = -1

    def __init__(self, batches):
        self.batches = list(batches)

    def read(self):
        return self.batches.pop(0) if self.batches else ring.EMPTY


def _batch(types, base=0):
    """Events of these types, each numbered (base + its index) in its flags field."""
    size = events.EVENT_SIZE
    chunk = b"".join((size.to_bytes(4, "little") + bytes(4) +
                      (t.to_bytes(4, "little") + (base + i).to_bytes(4, "little"))
                      .ljust(size, b"\0")).ljust(ring.stride_of(size), b"\0")
                     for i, t in enumerate(types))
    return ring.parse(chunk, size)[0]


def _seq(raws):
    return [(int.from_bytes(r[:4], "little"), int.from_bytes(r[4:8], "little")) for r in raws]


def test_the_hub_hands_each_subscriber_the_events_it_wants_in_order(monkeypatch):
    from hyperplane.datapath import settings
    monkeypatch.setattr(settings, "set_flags", lambda *a: None)
    types = [int(T.FLOW_CONFIRMED), int(T.FLOW_EXPIRED), int(T.FLOW_CREATED),
             int(T.FLOW_CLOSED), int(T.FLOW_CONFIRMED), int(T.FLOW_REJECTED)] * 50
    first, second = types[:100], types[100:]
    reads = _Reads([_batch(first), _batch(second, base=100)])
    hub = events.EventHub(None, ring_reader=reads)
    logs, follower, batches = [], [], []
    hub.subscribe_batches(lambda b: batches.append(b.count))
    hub.subscribe_events(logs.append, types=DELETING)

    def broken(raw):
        raise RuntimeError("a subscriber's bug")
    hub.subscribe_events(broken, types={int(T.FLOW_REJECTED)})
    hub.MAX_READS = 1                   # one batch per consume
    assert hub.consume() == len(first)
    hub.subscribe_events(follower.append)         # a follower of every event, from now
    assert hub.consume() == len(second)
    assert hub.consume() == 0
    numbered = list(zip(types, range(len(types))))
    assert _seq(logs) == [x for x in numbered if x[0] in DELETING]
    assert _seq(follower) == numbered[100:]
    assert batches == [100, 200]
    assert hub.subscriber_errors == types.count(int(T.FLOW_REJECTED))
    assert hub.events == len(types)
