"""The NLB resource model: load balancers, listeners, target groups and targets.

Shapes, ranges and defaults follow AWS Network Load Balancer (REFERENCE.md). Every
class checks itself on construction and loads from / saves to plain dicts (JSON and
TOML can hold them: no None values are written). A bad value is a ConfigError of one
sentence that names where it is ("target group 'web': target 10.1.0.11:80: weight ...").
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from hyperplane import validate
from hyperplane.errors import ConfigError
from hyperplane.nlb.health import (Endpoint, HealthCheckConfig, HealthState, TargetHealth,
                               healthy_targets)
from hyperplane.nlb.maglev import Backend

# Listener protocol -> the IP protocol numbers its BPF listener keys use.
LISTENER_PROTOCOLS = {"TCP": (6,), "UDP": (17,), "TCP_UDP": (6, 17)}
# AWS's target states: the first three come from health checks, the last two from
# registration (deregistering; registered but not used by any listener).
TARGET_STATES = ("initial", "healthy", "unhealthy", "draining", "unused")
NO_NEW_FLOWS = frozenset({"draining", "unused"})
MAX_WEIGHT = 65535
DEREGISTRATION_DELAY_RANGE_S = (0, 3600)
IDLE_TIMEOUT_RANGE_S = (60, 6000)
MAX_SHARD_SIZE = 64                    # a fleet's most nodes (hyperplane.fleet.cluster.MAX_NODES)
AWS_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")  # 1-32, no edge hyphen


# Shared with the NAT config (hyperplane.validate): one sentence per bad value.
_context = validate.context
_integer = validate.integer
_ipv4 = validate.ipv4


def _kwargs(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """data checked against cls's fields: no unknown keys, every required one present."""
    return validate.dataclass_table(cls, data, what)


def _name(what: str, value: Any) -> None:
    if not isinstance(value, str) or not AWS_NAME.fullmatch(value):
        raise ConfigError(f"A {what} name must be 1-32 letters, digits or hyphens, not "
                          f"starting or ending with a hyphen, got {value!r}.")


def _without_none(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


@dataclass
class LoadBalancer:
    name: str
    lb_id: int                         # its row in the data path's tables (struct target_value.lb_id)
    shard_size: int | None = None      # nodes of the fleet that carry it (None: the default)

    def __post_init__(self) -> None:
        _name("load balancer", self.name)
        with _context(f"Load balancer {self.name!r}"):
            _integer("lb_id", self.lb_id, 0, 2**32 - 1)
            if self.shard_size is not None:
                _integer("shard_size", self.shard_size, 1, MAX_SHARD_SIZE)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadBalancer:
        return cls(**_kwargs(cls, data, "load balancer"))

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self))


@dataclass
class Listener:
    lb: str                            # the load balancer's name
    vip: IPv4Address                   # a str is accepted and converted
    port: int
    protocol: str                      # TCP, UDP or TCP_UDP
    target_group: str                  # the target group's name

    def __post_init__(self) -> None:
        with _context(f"Listener {self.vip}:{self.port}"):
            self.vip = validate.unicast_ipv4("vip", self.vip)
            _integer("port", self.port, 1, 65535)
            if not isinstance(self.protocol, str) or self.protocol.upper() not in LISTENER_PROTOCOLS:
                raise ConfigError(f"protocol must be one of {', '.join(LISTENER_PROTOCOLS)}, "
                                  f"got {self.protocol!r}.")
            self.protocol = self.protocol.upper()
            _name("load balancer", self.lb)
            _name("target group", self.target_group)

    @property
    def ip_protocols(self) -> tuple[int, ...]:
        """IP protocol numbers this listener answers (TCP_UDP: both)."""
        return LISTENER_PROTOCOLS[self.protocol]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Listener:
        return cls(**_kwargs(cls, data, "listener"))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "vip": str(self.vip)}


@dataclass
class Target:
    ip: IPv4Address                    # a str is accepted and converted
    port: int
    weight: int = 1                    # share of new flows relative to the other targets
    state: str = "initial"
    draining_since: float | None = None  # wall-clock time (time.time()) deregistration began

    def __post_init__(self) -> None:
        with _context(f"Target {self.ip}:{self.port}"):
            self.ip = _ipv4("ip", self.ip)
            _integer("port", self.port, 1, 65535)
            _integer("weight", self.weight, 1, MAX_WEIGHT)
            if self.state not in TARGET_STATES:
                raise ConfigError(f"state must be one of {', '.join(TARGET_STATES)}, "
                                  f"got {self.state!r}.")
            if (self.state == "draining") != (self.draining_since is not None):
                raise ConfigError("draining_since must be set exactly when state is draining.")
            if self.draining_since is not None and (
                    isinstance(self.draining_since, bool)
                    or not isinstance(self.draining_since, (int, float))):
                raise ConfigError(f"draining_since must be a time in seconds, "
                                  f"got {self.draining_since!r}.")

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(str(self.ip), self.port)

    @property
    def identity(self) -> str:
        """Stable across nodes: what the Maglev table hashes."""
        return str(self.endpoint)

    def start_draining(self, now: float) -> None:
        """Deregister: no new flows from now on; existing ones carry on until the drain ends."""
        if self.state != "draining":
            self.state, self.draining_since = "draining", now

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        return cls(**_kwargs(cls, data, "target"))

    def to_dict(self) -> dict[str, Any]:
        return _without_none({**dataclasses.asdict(self), "ip": str(self.ip)})


@dataclass
class TargetGroup:
    name: str
    targets: list[Target] = field(default_factory=list)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    deregistration_delay_s: int = 300
    idle_timeout_tcp_s: int = 350
    idle_timeout_udp_s: int = 120      # fixed at 120 in AWS; here settable in the TCP range
    reset_on_unhealthy: bool = False   # RST flows of a target that turns unhealthy

    def __post_init__(self) -> None:
        _name("target group", self.name)
        with _context(f"Target group {self.name!r}"):
            if not isinstance(self.health_check, HealthCheckConfig):
                raise ConfigError("health_check must be a HealthCheckConfig.")
            _integer("deregistration_delay_s", self.deregistration_delay_s,
                     *DEREGISTRATION_DELAY_RANGE_S, " s")
            _integer("idle_timeout_tcp_s", self.idle_timeout_tcp_s, *IDLE_TIMEOUT_RANGE_S, " s")
            _integer("idle_timeout_udp_s", self.idle_timeout_udp_s, *IDLE_TIMEOUT_RANGE_S, " s")
            if not isinstance(self.reset_on_unhealthy, bool):
                raise ConfigError(f"reset_on_unhealthy must be true or false, "
                                  f"got {self.reset_on_unhealthy!r}.")
            seen = set()
            for target in self.targets:
                if target.identity in seen:
                    raise ConfigError(f"target {target.identity} is registered twice.")
                seen.add(target.identity)

    def target(self, endpoint: Endpoint) -> Target:
        for target in self.targets:
            if target.endpoint == endpoint:
                return target
        raise ConfigError(f"Target group {self.name!r} has no target {endpoint}.")

    def deregister(self, endpoint: Endpoint, now: float) -> Target:
        """Start the target's drain; it is removed once `expired_drains` returns it."""
        target = self.target(endpoint)
        target.start_draining(now)
        return target

    def expired_drains(self, now: float,
                       active_flow_counts: Mapping[Endpoint, int]) -> list[Target]:
        """Draining targets whose drain is over: the deregistration delay has passed, or
        no flow to them is left (a target missing from the counts has none)."""
        return [t for t in self.targets if t.state == "draining" and (
            now - t.draining_since >= self.deregistration_delay_s
            or active_flow_counts.get(t.endpoint, 0) == 0)]

    def record_health(self, health: Mapping[Endpoint, TargetHealth]) -> None:
        """Copy health-check states onto the targets (draining and unused ones keep theirs)."""
        for target in self.targets:
            if target.state not in NO_NEW_FLOWS and target.endpoint in health:
                target.state = str(health[target.endpoint].state)

    def routable_targets(self) -> list[Target]:
        """Targets new flows may go to: the healthy ones, or all that take new flows when
        none is (AWS fails open)."""
        return [self.targets[i] for i in self._routable_indices()]

    def maglev_backends(self) -> list[Backend]:
        """One Backend per target, in target order (so table entries index `targets`);
        targets that must not get new flows have weight 0."""
        routable = set(self._routable_indices())
        return [Backend(t.identity, t.weight if i in routable else 0)
                for i, t in enumerate(self.targets)]

    def _routable_indices(self) -> list[int]:
        health = {i: TargetHealth(state=HealthState(t.state))
                  for i, t in enumerate(self.targets) if t.state not in NO_NEW_FLOWS}
        excluded = {i for i, t in enumerate(self.targets) if t.state in NO_NEW_FLOWS}
        return healthy_targets(range(len(self.targets)), health, excluded)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetGroup:
        kwargs = _kwargs(cls, data, "target group")
        with _context(f"Target group {kwargs['name']!r}"):
            targets = kwargs.get("targets", [])
            if not isinstance(targets, list):
                raise ConfigError(f"targets must be a list, got {targets!r}.")
            kwargs["targets"] = [Target.from_dict(t) for t in targets]
            if "health_check" in kwargs:
                kwargs["health_check"] = HealthCheckConfig.from_dict(kwargs["health_check"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "targets": [t.to_dict() for t in self.targets],
                "health_check": self.health_check.to_dict()}


@dataclass
class NlbConfig:
    """Every NLB resource, checked as a whole: names are unique, listeners point at
    existing load balancers and target groups, and no two listeners claim the same
    (VIP, port, IP protocol)."""
    load_balancers: list[LoadBalancer] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    target_groups: list[TargetGroup] = field(default_factory=list)

    def __post_init__(self) -> None:
        lb_names = _unique("load balancer name", [lb.name for lb in self.load_balancers])
        _unique("load balancer lb_id", [lb.lb_id for lb in self.load_balancers])
        group_names = _unique("target group name", [tg.name for tg in self.target_groups])
        claimed: dict[tuple[IPv4Address, int, int], Listener] = {}
        for listener in self.listeners:
            where = f"Listener {listener.vip}:{listener.port}"
            if listener.lb not in lb_names:
                raise ConfigError(f"{where}: there is no load balancer {listener.lb!r}.")
            if listener.target_group not in group_names:
                raise ConfigError(f"{where}: there is no target group {listener.target_group!r}.")
            for proto in listener.ip_protocols:
                key = (listener.vip, listener.port, proto)
                if key in claimed:
                    raise ConfigError(f"{where}: {listener.protocol} overlaps the "
                                      f"{claimed[key].protocol} listener on the same port.")
                claimed[key] = listener

    def target_group(self, name: str) -> TargetGroup:
        for group in self.target_groups:
            if group.name == name:
                return group
        raise ConfigError(f"There is no target group {name!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NlbConfig:
        kwargs = _kwargs(cls, data, "NLB configuration")
        for key in kwargs:
            if not isinstance(kwargs[key], list):
                raise ConfigError(f"{key} must be a list, got {kwargs[key]!r}.")
        return cls(load_balancers=[LoadBalancer.from_dict(d) for d in kwargs.get("load_balancers", [])],
                   listeners=[Listener.from_dict(d) for d in kwargs.get("listeners", [])],
                   target_groups=[TargetGroup.from_dict(d) for d in kwargs.get("target_groups", [])])

    def to_dict(self) -> dict[str, Any]:
        return {"load_balancers": [lb.to_dict() for lb in self.load_balancers],
                "listeners": [listener.to_dict() for listener in self.listeners],
                "target_groups": [tg.to_dict() for tg in self.target_groups]}


def _unique(what: str, values: list) -> set:
    seen: set = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"The {what} {value!r} is used twice.")
        seen.add(value)
    return seen
