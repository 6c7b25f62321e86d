"""NLB target health checks, with AWS Network Load Balancer semantics.

A target starts "initial", turns healthy after `healthy_threshold` consecutive passing
checks and unhealthy after `unhealthy_threshold` consecutive failing ones. Checks are a
TCP connect (default) or an HTTP GET whose status must match (default 200-399). They can
run inside a network namespace: the lab's targets are only reachable from there.

If no target is healthy the NLB fails open and spreads flows over all of them
(`healthy_targets`).
"""
from __future__ import annotations

import dataclasses
import http.client
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from hyperplane.errors import ConfigError, EnvironmentProblem

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "http")
AWS_INTERVAL_RANGE_S = (5, 300)
AWS_TIMEOUT_RANGE_S = (2, 120)
AWS_THRESHOLD_RANGE = (2, 10)
AWS_STATUS_RANGE = (200, 599)      # what an NLB HTTP matcher may name
USER_AGENT = "ELB-HealthChecker/2.0"
PROBE_GRACE_S = 1.0                # slack past timeout_s before a probe counts as timed out
NETNS_RUN_DIR = "/var/run/netns"   # where `ip netns` (and pyroute2) keep named namespaces

# AWS's reason codes for a target's health, kept so `hpctl` can show the same words.
REASON_INITIAL = "Elb.InitialHealthChecking"
REASON_TIMEOUT = "Target.Timeout"
REASON_FAILED = "Target.FailedHealthChecks"
REASON_STATUS = "Target.ResponseCodeMismatch"


class HealthState(StrEnum):
    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


def parse_matcher(matcher: str) -> list[range]:
    """HTTP status codes a check accepts, AWS syntax: "200", "200,202", "200-399"."""
    ranges = []
    for part in matcher.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ConfigError(f"Health check matcher {matcher!r} is not a list of status "
                              f"codes or ranges like \"200-399\".") from None
        if not AWS_STATUS_RANGE[0] <= first <= last <= AWS_STATUS_RANGE[1]:
            raise ConfigError(f"Health check matcher {matcher!r} must name status codes "
                              f"within {AWS_STATUS_RANGE[0]}-{AWS_STATUS_RANGE[1]}, low to high.")
        ranges.append(range(first, last + 1))
    return ranges


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Health check {name} must be a number, got {value!r}.")
    return value


def _within(name: str, value: float, bounds: tuple[float, float], unit: str = "") -> None:
    low, high = bounds
    if not low <= value <= high:
        hint = " (set allow_fast for lab timings)" if unit and value < low else ""
        raise ConfigError(f"Health check {name} must be between {low} and {high}{unit}, "
                          f"got {value}{hint}.")


@dataclass(frozen=True)
class HealthCheckConfig:
    """A target group's health check. Ranges and defaults are AWS NLB's.

    `allow_fast` is the lab override: it lifts the lower bounds of interval_s and
    timeout_s (anything above 0, fractions allowed) so tests need not wait 5 s a round.
    """
    protocol: str = "tcp"
    port: int | None = None            # None: the target's traffic port
    path: str = "/"                    # HTTP only
    interval_s: float = 30
    timeout_s: float = 10
    healthy_threshold: int = 5
    unhealthy_threshold: int = 2
    matcher: str = "200-399"           # HTTP only: accepted status codes
    allow_fast: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or self.protocol.lower() not in PROTOCOLS:
            raise ConfigError(f"Health check protocol must be one of {', '.join(PROTOCOLS)}, "
                              f"got {self.protocol!r}.")
        object.__setattr__(self, "protocol", self.protocol.lower())  # AWS writes "TCP"
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 1 <= self.port <= 65535):
            raise ConfigError(f"Health check port must be 1-65535 or unset (the traffic port), "
                              f"got {self.port!r}.")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigError(f"Health check path must start with \"/\", got {self.path!r}.")
        interval = _number("interval_s", self.interval_s)
        timeout = _number("timeout_s", self.timeout_s)
        if self.allow_fast:
            if interval <= 0 or timeout <= 0:
                raise ConfigError("Health check interval_s and timeout_s must be above 0.")
            _within("interval_s", interval, (0, AWS_INTERVAL_RANGE_S[1]), " s")
            _within("timeout_s", timeout, (0, AWS_TIMEOUT_RANGE_S[1]), " s")
        else:
            _within("interval_s", interval, AWS_INTERVAL_RANGE_S, " s")
            _within("timeout_s", timeout, AWS_TIMEOUT_RANGE_S, " s")
        if timeout > interval:
            raise ConfigError(f"Health check timeout_s ({timeout}) must not exceed "
                              f"interval_s ({interval}): a check must end before the next.")
        for name in ("healthy_threshold", "unhealthy_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"Health check {name} must be an integer, got {value!r}.")
            _within(name, value, AWS_THRESHOLD_RANGE)
        if not isinstance(self.matcher, str):
            raise ConfigError(f"Health check matcher must be a string like \"200-399\", "
                              f"got {self.matcher!r}.")
        parse_matcher(self.matcher)

    def accepts_status(self, status: int) -> bool:
        return any(status in codes for codes in parse_matcher(self.matcher))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HealthCheckConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"Health check must be a table of fields, got {data!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Health check has unknown field {unknown[0]!r} "
                              f"(known: {', '.join(sorted(known))}).")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Fields with a value (TOML has no null: an unset port is left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Endpoint:
    """Where a target listens; also its identity in health maps and Maglev tables."""
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    reason: str = ""                   # an AWS reason code when not ok
    detail: str = ""                   # what happened, for people


Probe = Callable[[Endpoint], ProbeResult]


def tcp_probe(ip: str, port: int, timeout_s: float) -> ProbeResult:
    """Passes when a TCP connection opens (the socket is created in the calling
    thread's network namespace)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return ProbeResult(True)
    except TimeoutError as error:
        return ProbeResult(False, REASON_TIMEOUT, f"connect: {error}")
    except OSError as error:
        return ProbeResult(False, REASON_FAILED, f"connect: {error}")


def http_probe(ip: str, port: int, path: str, timeout_s: float,
               accepts_status: Callable[[int], bool]) -> ProbeResult:
    """Passes when GET path answers with an accepted status code."""
    connection = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    try:
        connection.request("GET", path, headers={"User-Agent": USER_AGENT,
                                                 "Connection": "close"})
        status = connection.getresponse().status
    except TimeoutError as error:
        return ProbeResult(False, REASON_TIMEOUT, f"GET {path}: {error}")
    except (OSError, http.client.HTTPException) as error:
        return ProbeResult(False, REASON_FAILED, f"GET {path}: {error!r}")
    finally:
        connection.close()
    if accepts_status(status):
        return ProbeResult(True, detail=f"HTTP {status}")
    return ProbeResult(False, REASON_STATUS, f"GET {path}: HTTP {status}")


def probe_target(config: HealthCheckConfig, target: Endpoint) -> ProbeResult:
    """One health check of one target, as `config` describes it."""
    port = config.port or target.port
    if config.protocol == "http":
        return http_probe(target.ip, port, config.path, config.timeout_s, config.accepts_status)
    return tcp_probe(target.ip, port, config.timeout_s)


@dataclass
class HealthChange:
    target: Endpoint
    old: HealthState
    new: HealthState
    reason: str = ""


@dataclass
class TargetHealth:
    """One target's health: its state and the run of equal results that leads to the next."""
    state: HealthState = HealthState.INITIAL
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    reason: str = ""                   # why it is not healthy, AWS's code
    detail: str = ""                   # the last failed check, for people

    def __post_init__(self) -> None:
        self.state = HealthState(self.state)
        if self.state is HealthState.INITIAL and not self.reason:
            self.reason = REASON_INITIAL

    def record(self, result: ProbeResult, config: HealthCheckConfig) -> HealthState | None:
        """Count one check; returns the new state when this check changed it."""
        old = self.state
        if result.ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if self.consecutive_successes >= config.healthy_threshold:
                self.state, self.reason, self.detail = HealthState.HEALTHY, "", ""
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            self.detail = result.detail
            if self.consecutive_failures >= config.unhealthy_threshold:
                self.state = HealthState.UNHEALTHY
            if self.state is HealthState.UNHEALTHY:
                self.reason = result.reason
        return self.state if self.state is not old else None


def _enter_netns(netns: str) -> None:
    """Thread-pool initializer: move this worker thread (only it: setns acts on the
    calling thread) into the namespace, so every socket it opens lives there."""
    from pyroute2.netns import setns  # imported here: only netns probes need pyroute2
    setns(netns, flags=0)             # flags=0: never create a missing namespace


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


class HealthChecker:
    """Checks a set of targets, all at once, each check bounded by timeout_s.

    `tick()` runs one round and returns what changed; `run()` repeats it every
    interval_s until stopped. `probe` replaces the real check (tests); `netns` makes the
    checks from inside that network namespace (needs CAP_SYS_ADMIN). Thread-safe:
    `set_targets` may be called while `run` loops in another thread.
    """

    def __init__(self, config: HealthCheckConfig, targets: Iterable[Endpoint] = (), *,
                 probe: Probe | None = None, netns: str | None = None,
                 max_workers: int = 64) -> None:
        if netns is not None and not os.path.exists(_netns_path(netns)):
            raise ConfigError(f"Network namespace {netns!r} does not exist "
                              f"(no {_netns_path(netns)}).")
        self.config = config
        self.netns = netns
        self.probe: Probe = probe or (lambda target: probe_target(self.config, target))
        self.max_workers = max_workers
        self.targets: tuple[Endpoint, ...] = ()
        self.health: dict[Endpoint, TargetHealth] = {}
        self._lock = threading.Lock()
        # Worker threads live as long as the checker: with a netns each enters it once.
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers,
            thread_name_prefix=f"health-{netns or 'host'}",
            initializer=_enter_netns if netns else None,
            initargs=(netns,) if netns else ())
        self.set_targets(targets)

    def set_targets(self, targets: Iterable[Endpoint]) -> None:
        """Check these from now on: new targets start "initial", the others keep their state."""
        targets = list(dict.fromkeys(targets))
        with self._lock:
            self.health = {t: self.health.get(t) or TargetHealth() for t in targets}
            self.targets = tuple(targets)

    def state_of(self, target: Endpoint) -> HealthState:
        with self._lock:
            health = self.health.get(target)
            return health.state if health else HealthState.INITIAL

    def tick(self) -> list[HealthChange]:
        """Probe every target once, concurrently; update and report state changes."""
        with self._lock:
            targets = self.targets
        results = self._probe_all(targets)
        changes = []
        with self._lock:
            for target, result in results.items():
                health = self.health.get(target)
                if health is None:       # deregistered while being probed
                    continue
                old = health.state
                new = health.record(result, self.config)
                if new is not None:
                    changes.append(HealthChange(target, old, new, health.reason))
        for change in changes:
            log.info("target %s: %s -> %s %s", change.target, change.old, change.new,
                     change.reason)
        return changes

    def _probe_all(self, targets: tuple[Endpoint, ...]) -> dict[Endpoint, ProbeResult]:
        try:
            futures: dict[Endpoint, Future] = {t: self._pool.submit(self.probe, t)
                                               for t in targets}
        except BrokenExecutor:
            raise self._netns_problem() from None
        # More targets than workers run in waves; each wave gets the full timeout.
        waves = math.ceil(len(targets) / self.max_workers)
        wait(futures.values(), timeout=waves * self.config.timeout_s + PROBE_GRACE_S)
        results = {}
        for target, future in futures.items():
            if not future.done():
                future.cancel()
                results[target] = ProbeResult(False, REASON_TIMEOUT, "check did not finish")
            elif future.exception() is not None:
                error = future.exception()
                if isinstance(error, BrokenExecutor):
                    raise self._netns_problem() from None
                results[target] = ProbeResult(False, REASON_FAILED, f"check raised {error!r}")
            else:
                results[target] = future.result()
        return results

    def _netns_problem(self) -> EnvironmentProblem:
        # The only way our pool breaks is its initializer failing to enter the netns.
        return EnvironmentProblem(
            f"Health checks could not enter network namespace {self.netns!r} (it takes root, "
            f"CAP_SYS_ADMIN, and a namespace file); the log has the error.")

    def run(self, stop: threading.Event,
            on_change: Callable[[list[HealthChange]], None] | None = None) -> None:
        """Tick every interval_s (measured start to start) until `stop` is set."""
        while not stop.is_set():
            started = time.monotonic()
            changes = self.tick()
            if changes and on_change is not None:
                on_change(changes)
            stop.wait(max(0.0, self.config.interval_s - (time.monotonic() - started)))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> HealthChecker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


T = TypeVar("T")


def healthy_targets(targets: Iterable[T], health: Mapping[T, TargetHealth],
                    draining: Collection[T] = frozenset()) -> list[T]:
    """The targets new flows may go to: the healthy ones, or, when none is healthy, all
    of them (AWS NLB fails open). `draining` targets (deregistering, unused) never take
    new flows. A target missing from `health` has not been checked yet: "initial"."""
    candidates = [t for t in targets if t not in draining]
    healthy = [t for t in candidates
               if t in health and health[t].state is HealthState.HEALTHY]
    return healthy or candidates
