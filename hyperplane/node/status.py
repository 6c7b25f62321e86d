"""The node agent's status file as hpctl reads it: kept apart from the agent
(hyperplane.node.agent, which re-exports these) so that a read command (hpctl counters,
top, lb health, fleet status) imports none of the agent's fleet, sync and health-check code
(~0.2 s of CPU per command)."""
from __future__ import annotations

import os
import time

from hyperplane.errors import ConfigError, HyperplaneError
from hyperplane.node.lifecycle import read_state_file, state_path


def status_path(node: str) -> str:
    return state_path(node, ".agent.json")


def read_status(node: str) -> dict:
    """The agent's last status, with how old it is ("age_s") and whether the agent that
    wrote it still runs ("running"): a dead agent's status says nothing about now."""
    path = status_path(node)
    try:
        status = read_state_file(path, f"no agent status for node {node!r}: is the agent "
                                       f"running? (hpctl agent run --node {node})")
        _check_status(status)
    except (ConfigError, TypeError, AttributeError, KeyError) as exc:  # NotFound passes
        raise ConfigError(f"the agent status of node {node!r} is damaged ({exc}); restart the "
                          f"agent (hpctl nat up, or hpctl agent run --node {node})") from None
    status["age_s"] = round(max(0.0, time.time() - status["time"]), 1)
    status["running"] = pid_alive(status["pid"])
    return status


def _check_status(status: dict) -> None:
    if not isinstance(status.get("time"), (int, float)) or not isinstance(status.get("pid"), int):
        raise ConfigError("no time or pid")
    for targets in status["target_groups"].values():
        for t in targets.values():
            if not {"state", "active_flows", "packets"} <= set(t):
                raise ConfigError("a target without state, active_flows or packets")


def pid_alive(pid: int | None) -> bool:
    """Whether process pid runs (a zombie child of this process does not)."""
    if not pid or pid <= 0:  # kill(0 or -n) would name a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: kill(0) said it is there
        return True


def status_or_none(node: str) -> dict | None:
    """The agent's status, or None when no agent runs for the node (no health counts: a
    dead agent's would be stale)."""
    try:
        status = read_status(node)
    except HyperplaneError:
        return None
    return status if status["running"] else None
