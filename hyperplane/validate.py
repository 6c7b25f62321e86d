"""Checks shared by the config models (NAT gateways, nodes, load balancers).

Each check takes the field's name and the value as it came from JSON / TOML / flags, and
either returns it converted or raises a ConfigError of one sentence that names the field
and the value it got. JSON's types are taken at their word: a string is not a number, a
float is not an integer, a bool is not an integer, an integer is not an IP address."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hyperplane.errors import ConfigError


@contextmanager
def context(where: str) -> Iterator[None]:
    """Prefix ConfigErrors raised inside with where they happened."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        first = message.split(" ", 1)[0]
        if not (len(first) > 1 and first.isupper()):  # "A target ..." but not "NAT IP ..."
            message = message[:1].lower() + message[1:]
        raise ConfigError(f"{where}: {message}") from None


def table(what: str, data: Any, known: set[str], required: set[str] = frozenset()) -> dict:
    """data as a dict with no unknown keys and every required one."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"A {what} must be a table of fields, got {data!r}.")
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(f"A {what} has no field {unknown[0]!r} "
                          f"(fields: {', '.join(sorted(known))}).")
    missing = sorted(required - set(data))
    if missing:
        raise ConfigError(f"A {what} needs the field {missing[0]!r}.")
    return dict(data)


def dataclass_table(cls: type, data: Any, what: str) -> dict:
    """table() with the fields of a dataclass; those without a default are required."""
    fields = dataclasses.fields(cls)
    return table(what, data, {f.name for f in fields},
                 {f.name for f in fields if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING})


def integer(name: str, value: Any, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}{unit}, got {value!r}.")
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def string_list(name: str, value: Any, low: int = 0, high: int | None = None) -> list[str]:
    """A list of non-empty strings, low to high of them, none twice."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}.")
    if len(value) < low or (high is not None and len(value) > high):
        count = f"{low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must list {count}, got {len(value)}.")
    for i, v in enumerate(value):
        if v in value[:i]:
            raise ConfigError(f"{name} lists {v!r} twice.")
    return list(value)


def ipv4(name: str, value: Any) -> IPv4Address:
    """An IPv4 address written as a dotted-quad string (an integer is refused: JSON 1 is
    not 0.0.0.1)."""
    if not isinstance(value, (str, IPv4Address)):
        raise ConfigError(f"{name} must be an IPv4 address like \"192.0.2.1\", got {value!r}.")
    try:
        return IPv4Address(value)
    except ValueError:
        raise ConfigError(f"{name} must be an IPv4 address, got {value!r}.") from None


def unicast_ipv4(name: str, value: Any) -> IPv4Address:
    """An address a host may own: not 0.0.0.0, broadcast, multicast, loopback or 240/4."""
    ip = ipv4(name, value)
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_reserved:
        raise ConfigError(f"{name} must be a unicast address, got {ip}.")
    return ip


def ipv4_network(name: str, value: Any) -> IPv4Network:
    """A CIDR string; host bits are allowed and dropped (10.1.2.3/24 is 10.1.2.0/24)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a CIDR like \"10.0.0.0/8\", got {value!r}.")
    try:
        return IPv4Network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{name} must be an IPv4 network like \"10.0.0.0/8\", "
                          f"got {value!r}.") from None


def no_overlap(name: str, networks: list[tuple[str, IPv4Network]]) -> None:
    """networks: (owner, network). Two that overlap are refused: an address would belong
    to two owners (the longest prefix would win silently)."""
    for i, (owner_a, a) in enumerate(networks):
        for owner_b, b in networks[:i]:
            if a.overlaps(b):
                where = owner_a if owner_a == owner_b else f"{owner_b} and {owner_a}"
                raise ConfigError(f"{name} {b} and {a} overlap ({where}).")
