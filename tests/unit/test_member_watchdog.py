"""The agent's watchdog names a silent fleet task and logs where it is stuck."""
from __future__ import annotations

import threading

from hyperplane.fleet.member import FleetMember


def test_stacks_say_where_a_named_task_waits():
    stop, inside = threading.Event(), threading.Event()

    def stuck_in_here():
        inside.set()
        stop.wait(30)

    t = threading.Thread(target=stuck_in_here, name="hp-test-sync")
    t.start()
    assert inside.wait(10)
    try:
        stacks = FleetMember.stacks(["hp-test-sync", "not-running"])
    finally:
        stop.set()
        t.join(5)
    assert list(stacks) == ["hp-test-sync"]
    assert "stuck_in_here" in stacks["hp-test-sync"] and "wait" in stacks["hp-test-sync"]
