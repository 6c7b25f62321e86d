"""Counters and metrics read from the maps: verdicts, events, per-gateway (AWS names)."""
from __future__ import annotations

from .verdicts import Stat, Verdict

# gw_metrics field -> AWS NAT gateway metric name (REFERENCE.md)
NAT_METRICS = {
    "connection_attempt": "ConnectionAttemptCount",
    "connection_established": "ConnectionEstablishedCount",
    "error_port_allocation": "ErrorPortAllocation",
    "idle_timeout": "IdleTimeoutCount",
    "packets_drop": "PacketsDropCount",
    "bytes_in_from_source": "BytesInFromSource",
    "bytes_out_to_destination": "BytesOutToDestination",
    "bytes_in_from_destination": "BytesInFromDestination",
    "bytes_out_to_source": "BytesOutToSource",
    "packets_in_from_source": "PacketsInFromSource",
    "packets_out_to_destination": "PacketsOutToDestination",
    "packets_in_from_destination": "PacketsInFromDestination",
    "packets_out_to_source": "PacketsOutToSource",
}


def _percpu_sum(table, index: int) -> int:
    return int(sum(table[table.Key(index)]))


def verdict_counts(dp) -> dict[str, int]:
    table = dp.table("verdicts")
    return {v.name: _percpu_sum(table, v) for v in Verdict}


def stat_counts(dp) -> dict[str, int]:
    table = dp.table("stats")
    return {s.name: _percpu_sum(table, s) for s in Stat}


def gateway_metrics(dp, gw_id: int) -> dict[str, int]:
    """AWS-named metrics of one gateway, summed over CPUs; ActiveConnectionCount is
    counted from the live flows."""
    from .flows import list_flows
    table = dp.table("gw_stats")
    per_cpu = table[table.Key(gw_id)]
    out = {aws: sum(getattr(cpu, field) for cpu in per_cpu) for field, aws in NAT_METRICS.items()}
    out["ActiveConnectionCount"] = sum(
        1 for f in list_flows(dp) if f.kind == "NAT_OUT" and f.resource == gw_id and f.live)
    return out
