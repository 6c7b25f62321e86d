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
