"""Stopping a node removes every state file it left, the flow-event socket of an agent
that was killed (SIGKILL leaves it) included."""
from __future__ import annotations

import os

from hyperplane.node import lifecycle


def test_stop_node_removes_every_state_file_a_killed_agent_left(monkeypatch, tmp_path):
    state_dir = tmp_path / "nodes"
    state_dir.mkdir()
    monkeypatch.setattr(lifecycle, "NODE_STATE_DIR", str(state_dir))
    suffixes = (".json", ".agent.json", ".agent.log", ".agent.vips.json", ".events.sock")
    for suffix in suffixes:
        (state_dir / f"n1{suffix}").write_text("{}" if suffix.endswith(".json") else "")
    (state_dir / "n2.events.sock").write_text("")      # another node's: kept
    warnings = lifecycle.stop_node("n1", [], pin_root=str(tmp_path / "pins"))
    assert sorted(os.listdir(state_dir)) == ["n2.events.sock"], warnings
