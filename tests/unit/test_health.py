"""Health checks: config ranges, the state machine, real TCP/HTTP probes on 127.0.0.1,
concurrency and timeouts, fail-open, and probing from inside a network namespace."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from hyperplane.errors import ConfigError, EnvironmentProblem
from hyperplane.nlb.health import (REASON_FAILED, REASON_INITIAL, REASON_STATUS, REASON_TIMEOUT,
                               Endpoint, HealthChecker, HealthCheckConfig, HealthState,
                               ProbeResult, TargetHealth, healthy_targets, http_probe,
                               probe_target, tcp_probe)

FAST = HealthCheckConfig(interval_s=0.2, timeout_s=0.2, healthy_threshold=3,
                         unhealthy_threshold=2, allow_fast=True)
A, B, C = Endpoint("10.1.0.11", 80), Endpoint("10.1.0.12", 80), Endpoint("10.1.0.13", 80)


# --- config -----------------------------------------------------------------------------

def test_defaults_are_aws_nlb_defaults() -> None:
    config = HealthCheckConfig()
    assert (config.protocol, config.port, config.interval_s, config.timeout_s,
            config.healthy_threshold, config.unhealthy_threshold, config.matcher) == \
        ("tcp", None, 30, 10, 5, 2, "200-399")


@pytest.mark.parametrize("field, value, words", [
    ("interval_s", 4, "interval_s must be between 5 and 300"),
    ("interval_s", 301, "interval_s must be between 5 and 300"),
    ("interval_s", "30", "interval_s must be a number"),
    ("timeout_s", 1, "timeout_s must be between 2 and 120"),
    ("healthy_threshold", 1, "healthy_threshold must be between 2 and 10"),
    ("healthy_threshold", 11, "healthy_threshold must be between 2 and 10"),
    ("unhealthy_threshold", 1, "unhealthy_threshold must be between 2 and 10"),
    ("unhealthy_threshold", 2.5, "unhealthy_threshold must be an integer"),
    ("protocol", "icmp", "protocol must be one of"),
    ("port", 0, "port must be 1-65535"),
    ("path", "health", "path must start with"),
    ("matcher", "200-", "matcher"),
    ("matcher", "100-200", "within 200-599"),
    ("matcher", "399-200", "low to high"),
])
def test_out_of_range_values_are_rejected_naming_the_field(field: str, value, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        HealthCheckConfig(**{field: value})


def test_timeout_longer_than_interval_is_rejected() -> None:
    with pytest.raises(ConfigError, match="must not exceed interval_s"):
        HealthCheckConfig(interval_s=5, timeout_s=6)


def test_allow_fast_admits_sub_second_timings_but_keeps_thresholds() -> None:
    with pytest.raises(ConfigError, match="allow_fast"):
        HealthCheckConfig(interval_s=0.2, timeout_s=0.1)
    assert HealthCheckConfig(interval_s=0.2, timeout_s=0.1, allow_fast=True).interval_s == 0.2
    with pytest.raises(ConfigError, match="above 0"):
        HealthCheckConfig(interval_s=0, timeout_s=0, allow_fast=True)
    with pytest.raises(ConfigError, match="healthy_threshold"):
        HealthCheckConfig(interval_s=0.2, timeout_s=0.1, healthy_threshold=1, allow_fast=True)


def test_protocol_is_case_insensitive_as_aws_writes_it() -> None:
    assert HealthCheckConfig(protocol="HTTP").protocol == "http"


def test_matcher_lists_and_ranges() -> None:
    config = HealthCheckConfig(protocol="http", matcher="200,202,300-302")
    assert [s for s in (200, 201, 202, 300, 302, 303) if config.accepts_status(s)] == \
        [200, 202, 300, 302]


def test_dict_round_trip_and_unknown_field() -> None:
    config = HealthCheckConfig(protocol="http", port=8080, path="/healthz", interval_s=10,
                               timeout_s=5, healthy_threshold=3, matcher="200")
    assert HealthCheckConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown field 'intervall_s'"):
        HealthCheckConfig.from_dict({"intervall_s": 10})


# --- state machine ------------------------------------------------------------------------

class ScriptedProbe:
    """A fake probe: each target passes or fails as the test says (`up` holds the
    targets that pass); counts calls per target."""

    def __init__(self, up: set[Endpoint]) -> None:
        self.up = up
        self.calls: dict[Endpoint, int] = {}

    def __call__(self, target: Endpoint) -> ProbeResult:
        self.calls[target] = self.calls.get(target, 0) + 1
        return ProbeResult(True) if target in self.up else ProbeResult(False, REASON_FAILED)


def states(checker: HealthChecker) -> dict[Endpoint, str]:
    return {t: checker.state_of(t) for t in checker.targets}


def test_new_target_is_initial_until_healthy_threshold_successes() -> None:
    probe = ScriptedProbe(up={A, B})
    with HealthChecker(FAST, [A, B], probe=probe) as checker:
        assert states(checker) == {A: "initial", B: "initial"}
        assert checker.health[A].reason == REASON_INITIAL
        assert checker.tick() == [] and checker.tick() == []
        assert states(checker) == {A: "initial", B: "initial"}
        changes = checker.tick()                               # third success: threshold 3
        assert {(c.target, c.old, c.new) for c in changes} == \
            {(A, "initial", "healthy"), (B, "initial", "healthy")}
        assert probe.calls == {A: 3, B: 3}


def test_killed_target_unhealthy_after_exactly_threshold_failures_then_recovers() -> None:
    probe = ScriptedProbe(up={A, B})
    with HealthChecker(FAST, [A, B], probe=probe) as checker:
        for _ in range(3):
            checker.tick()
        assert states(checker) == {A: "healthy", B: "healthy"}

        probe.up.discard(A)                                    # A dies
        assert checker.tick() == []                            # 1 failure < 2
        assert checker.state_of(A) == "healthy"
        changes = checker.tick()                               # 2nd failure
        assert [(c.target, c.new, c.reason) for c in changes] == [(A, "unhealthy", REASON_FAILED)]
        assert checker.tick() == []                            # stays unhealthy, no repeat

        probe.up.add(A)                                        # A comes back
        assert checker.tick() == [] and checker.tick() == []
        assert checker.state_of(A) == "unhealthy"
        changes = checker.tick()                               # 3rd success
        assert [(c.target, c.old, c.new) for c in changes] == [(A, "unhealthy", "healthy")]
        assert checker.state_of(B) == "healthy"


def test_a_success_resets_the_failure_run() -> None:
    health = TargetHealth(state=HealthState.HEALTHY)
    fail, ok = ProbeResult(False, REASON_FAILED), ProbeResult(True)
    for result in (fail, ok, fail, ok, fail):
        assert health.record(result, FAST) is None
    assert health.state is HealthState.HEALTHY and health.reason == ""


def test_initial_target_that_never_answers_becomes_unhealthy() -> None:
    with HealthChecker(FAST, [A], probe=ScriptedProbe(up=set())) as checker:
        checker.tick()
        assert checker.state_of(A) == "initial"
        assert [c.new for c in checker.tick()] == ["unhealthy"]


def test_set_targets_keeps_known_state_and_starts_new_ones_initial() -> None:
    with HealthChecker(FAST, [A], probe=ScriptedProbe(up={A, B})) as checker:
        for _ in range(3):
            checker.tick()
        checker.set_targets([A, B])
        assert states(checker) == {A: "healthy", B: "initial"}
        checker.set_targets([B])
        assert states(checker) == {B: "initial"}


def test_probes_run_concurrently_and_a_hung_probe_counts_as_timeout() -> None:
    release = threading.Event()
    targets = [Endpoint(f"10.1.1.{i}", 80) for i in range(1, 21)]
    hung = targets[0]

    def slow_probe(target: Endpoint) -> ProbeResult:
        if target == hung:
            release.wait(10)
            return ProbeResult(True)
        time.sleep(0.15)
        return ProbeResult(True)

    config = HealthCheckConfig(interval_s=1, timeout_s=0.5, healthy_threshold=2,
                               unhealthy_threshold=2, allow_fast=True)
    with HealthChecker(config, targets, probe=slow_probe) as checker:
        checker.tick()
        release.set()
    # The hung probe blocks for up to 10 s: that the tick came back and counted it as a
    # failure (it would have succeeded once released) shows the timeout bounded the tick.
    assert checker.health[hung].consecutive_failures == 1
    assert all(checker.health[t].consecutive_successes == 1 for t in targets[1:])


def test_probe_that_raises_counts_as_failure() -> None:
    def broken(target: Endpoint) -> ProbeResult:
        raise RuntimeError("boom")

    with HealthChecker(FAST, [A], probe=broken) as checker:
        checker.tick()
        assert checker.health[A].consecutive_failures == 1
        assert "boom" in checker.health[A].detail


def test_run_ticks_at_the_interval_until_stopped() -> None:
    """run() starts a tick once per interval: whatever the machine's load (which only makes
    the gaps longer), two ticks never start closer than the interval; and it stops when
    told."""
    probe = ScriptedProbe(up={A})
    starts: list[float] = []
    seen: list[list] = []
    stop = threading.Event()
    with HealthChecker(FAST, [A], probe=probe) as checker:
        tick = checker.tick

        def timed_tick():
            starts.append(time.monotonic())
            return tick()

        checker.tick = timed_tick
        runner = threading.Thread(target=checker.run, args=(stop, seen.append))
        runner.start()
        deadline = time.monotonic() + 30
        while len(starts) < 4 and time.monotonic() < deadline:   # a bound, not a timing
            time.sleep(0.01)
        stop.set()
        runner.join(10)
    assert not runner.is_alive()
    assert len(starts) >= 4, f"only {len(starts)} ticks in 30 s"
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= FAST.interval_s - 0.005, f"ticks closer than the interval: {gaps}"
    assert probe.calls[A] == len(starts)
    assert [[(c.target, c.new) for c in changes] for changes in seen] == [[(A, "healthy")]]


def test_missing_namespace_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        HealthChecker(FAST, [A], netns=f"hp-no-such-ns-{uuid.uuid4().hex[:8]}")


def test_namespace_that_cannot_be_entered_is_an_environment_problem(tmp_path) -> None:
    not_a_namespace = tmp_path / "netns"
    not_a_namespace.write_text("")
    with HealthChecker(FAST, [A], netns=str(not_a_namespace)) as checker:
        with pytest.raises(EnvironmentProblem, match="could not enter network namespace"):
            checker.tick()


# --- fail open ----------------------------------------------------------------------------

def health_of(**states: str) -> dict[Endpoint, TargetHealth]:
    by_name = {"A": A, "B": B, "C": C}
    return {by_name[name]: TargetHealth(state=HealthState(state)) for name, state in states.items()}


def test_only_healthy_targets_take_new_flows() -> None:
    assert healthy_targets([A, B, C], health_of(A="healthy", B="unhealthy", C="initial")) == [A]


def test_no_healthy_target_fails_open_to_all() -> None:
    assert healthy_targets([A, B, C], health_of(A="unhealthy", B="unhealthy")) == [A, B, C]
    assert healthy_targets([A, B], {}) == [A, B]


def test_draining_targets_never_take_new_flows_even_failing_open() -> None:
    health = health_of(A="healthy", B="unhealthy", C="unhealthy")
    assert healthy_targets([A, B, C], health, draining={A}) == [B, C]
    assert healthy_targets([A, B, C], health, draining={B}) == [A]
    assert healthy_targets([A], health, draining={A}) == []


# --- real probes on 127.0.0.1 -------------------------------------------------------------

@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as placeholder:                       # bound, never listening
        placeholder.bind(("127.0.0.1", 0))
        return placeholder.getsockname()[1]


class StatusHandler(http.server.BaseHTTPRequestHandler):
    """Answers /ok with 200 and anything else with 500; remembers User-Agents."""
    user_agents: list[str] = []

    def do_GET(self) -> None:
        StatusHandler.user_agents.append(self.headers.get("User-Agent", ""))
        self.send_response(200 if self.path == "/ok" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_tcp_probe_passes_on_a_listening_port(listening_port: int) -> None:
    assert tcp_probe("127.0.0.1", listening_port, 1.0).ok


def test_tcp_probe_fails_on_a_closed_port(closed_port: int) -> None:
    result = tcp_probe("127.0.0.1", closed_port, 1.0)
    assert not result.ok and result.reason == REASON_FAILED


def test_http_probe_checks_the_status_code(http_port: int) -> None:
    config = HealthCheckConfig(protocol="http", path="/ok")
    assert http_probe("127.0.0.1", http_port, "/ok", 1.0, config.accepts_status).ok
    failing = http_probe("127.0.0.1", http_port, "/fail", 1.0, config.accepts_status)
    assert not failing.ok and failing.reason == REASON_STATUS and "500" in failing.detail
    assert StatusHandler.user_agents[-1].startswith("ELB-HealthChecker")
    assert http_probe("127.0.0.1", http_port, "/fail", 1.0, lambda status: status == 500).ok


def test_http_probe_on_a_closed_port_fails(closed_port: int) -> None:
    result = http_probe("127.0.0.1", closed_port, "/", 1.0, lambda status: True)
    assert not result.ok and result.reason == REASON_FAILED


def test_tcp_probe_times_out_on_a_full_accept_queue() -> None:
    # A listener with a full backlog whose SYNs are dropped: connect() hangs.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            result = None
            for _ in range(8):                                 # fill the backlog
                result = tcp_probe("127.0.0.1", port, 0.3)
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
                if not result.ok:
                    break
            assert result is not None and not result.ok and result.reason == REASON_TIMEOUT
        finally:
            for filler in fillers:
                filler.close()


def test_checker_uses_health_check_port_override(listening_port: int, closed_port: int) -> None:
    target = Endpoint("127.0.0.1", closed_port)                # traffic port: closed
    config = HealthCheckConfig(port=listening_port, interval_s=0.2, timeout_s=0.2,
                               healthy_threshold=2, allow_fast=True)
    assert probe_target(config, target).ok
    with HealthChecker(config, [target]) as checker:
        checker.tick()
        assert [c.new for c in checker.tick()] == ["healthy"]


def test_checker_with_real_http_probes(http_port: int) -> None:
    target = Endpoint("127.0.0.1", http_port)
    passing = HealthCheckConfig(protocol="http", path="/ok", interval_s=0.5, timeout_s=0.5,
                                healthy_threshold=2, unhealthy_threshold=2, allow_fast=True)
    failing = HealthCheckConfig(**{**passing.to_dict(), "path": "/fail"})
    with HealthChecker(passing, [target]) as good, HealthChecker(failing, [target]) as bad:
        for _ in range(2):
            good.tick()
            bad.tick()
        assert good.state_of(target) == "healthy"
        assert bad.state_of(target) == "unhealthy"
        assert bad.health[target].reason == REASON_STATUS


# --- inside a network namespace ----------------------------------------------------------

@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    name = f"hp-test-health-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


@pytest.mark.root
def test_probe_runs_inside_the_namespace(namespace: str) -> None:
    # A listener on 127.0.0.1 inside the namespace: reachable from there only.
    listener = subprocess.Popen(
        ["ip", "netns", "exec", namespace, "python3", "-c",
         "import socket, sys, time\n"
         "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
         "print(s.getsockname()[1], flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        target = Endpoint("127.0.0.1", port)
        config = HealthCheckConfig(interval_s=0.5, timeout_s=0.5, healthy_threshold=2,
                                   allow_fast=True)
        with HealthChecker(config, [target], netns=namespace) as checker:
            checker.tick()
            assert [c.new for c in checker.tick()] == ["healthy"]
        with HealthChecker(config, [target]) as outside:       # the host has no such listener
            outside.tick()
            assert outside.health[target].consecutive_failures == 1
    finally:
        listener.kill()
        listener.wait()
