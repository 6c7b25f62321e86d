"""The fleet's sync task runs under SCHED_FIFO (FleetConfig.sync_rt_priority), falls back
to normal scheduling with one warning when the kernel refuses, and the priority is checked
where an operator gives it."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from hyperplane.fleet.member import FleetConfig, FleetMember


def _in_a_thread(member, calls: int = 1) -> tuple[int, str]:
    """Run _set_sync_scheduling `calls` times in a fresh thread (it sets the calling
    thread's policy); the thread's policy afterwards, and the member's status string."""
    out = {}

    def body():
        for _ in range(calls):
            FleetMember._set_sync_scheduling(member)
        out["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    return out["policy"], member.sync_scheduling


def _member(priority: int):
    return SimpleNamespace(config=FleetConfig(sync_rt_priority=priority),
                           sync_scheduling="not started")


def test_the_sync_thread_runs_fifo_at_the_configured_priority():
    assert os.geteuid() == 0, "this test sets a real-time policy: it needs root"
    policy, status = _in_a_thread(_member(7))
    assert policy == os.SCHED_FIFO, "the kernel refused SCHED_FIFO to root: " + status
    assert status == "fifo 7"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER     # only that thread


def test_zero_is_normal_scheduling():
    assert _in_a_thread(_member(0)) == (os.SCHED_OTHER, "normal")


def test_a_refusal_is_logged_once_and_the_task_runs_normally(monkeypatch, caplog):
    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="hyperplane.fleet.member"):
        policy, status = _in_a_thread(_member(10), calls=3)   # the task restarted twice
    assert policy == os.SCHED_OTHER
    assert status == "normal (SCHED_FIFO 10 refused: Operation not permitted)"
    assert len([r for r in caplog.records if "SCHED_FIFO" in r.getMessage()]) == 1


def test_the_cli_says_the_agents_default():
    from hpctl.options import REFRESH_S_DEFAULT, SWEEP_S_DEFAULT, SYNC_RT_PRIORITY_DEFAULT
    cfg = FleetConfig()
    assert (SYNC_RT_PRIORITY_DEFAULT, REFRESH_S_DEFAULT, SWEEP_S_DEFAULT) == \
        (cfg.sync_rt_priority, cfg.refresh_s, cfg.sweep_s)


@pytest.mark.parametrize("args, says", [
    (["--refresh-s", "0"], "--refresh-s 0.0: 0.1-3600 seconds"),
    (["--sweep-s", "5"], "--sweep-s 5.0: 0 (off) or from --refresh-s (10.0) to 86400"),
    (["--refresh-s", "2", "--sweep-s", "1"], "--sweep-s 1.0: 0 (off) or from --refresh-s"),
])
def test_the_agent_refuses_refresh_and_sweep_periods_out_of_range(args, says, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hyperplane.node.agent", "--node", "n1",
                           "--store", str(tmp_path / "store.json"), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr


def test_the_cli_passes_the_fleet_settings_to_the_agent():
    from hyperplane.node.agent import fleet_args
    assert fleet_args() == []
    assert fleet_args(5, 1.0, 2.5) == ["--sync-rt-priority", "5", "--refresh-s", "1.0",
                                       "--sweep-s", "2.5"]
    assert fleet_args(sweep_s=0.0) == ["--sweep-s", "0.0"]


@pytest.mark.parametrize("value", ["100", "-1"])
def test_the_agent_refuses_a_priority_out_of_range(value, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hyperplane.node.agent", "--node", "n1",
                           "--store", str(tmp_path / "store.json"), "--sync-rt-priority", value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"--sync-rt-priority {value}: a SCHED_FIFO priority is 1-99" in proc.stderr
