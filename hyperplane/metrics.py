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
        1 for f in list_flows(dp, kind="NAT_OUT") if f.resource == gw_id and f.open)
    return out


# lb_metrics field -> AWS Network Load Balancer metric name (REFERENCE.md)
NLB_METRICS = {
    "new_flow": "NewFlowCount",
    "processed_bytes": "ProcessedBytes",
    "processed_packets": "ProcessedPackets",
    "tcp_client_reset": "TCP_Client_Reset_Count",
    "tcp_target_reset": "TCP_Target_Reset_Count",
    "tcp_elb_reset": "TCP_ELB_Reset_Count",
}


def load_balancer_metrics(dp, status: dict | None = None) -> dict:
    """AWS-named metrics per load balancer id, summed over its listeners and CPUs.

    ActiveFlowCount is counted from the live flows; Healthy/UnHealthyHostCount
    come from the agent's status (the health checks run there)."""
    from .flows import list_flows
    table = dp.table("lb_stats")
    by_lb: dict[int, set] = {}
    for k, v in dp.table("listeners").items():
        by_lb.setdefault(v.lb_id, set()).add(v.listener_id)
    out = {}
    flows = [f for f in list_flows(dp, kind="NLB_IN") if f.open]
    for lb_id, lids in sorted(by_lb.items()):
        m = {aws: 0 for aws in NLB_METRICS.values()}
        for lid in lids:
            for cpu in table[table.Key(lid)]:
                for field, aws in NLB_METRICS.items():
                    m[aws] += getattr(cpu, field)
        m["ActiveFlowCount"] = sum(1 for f in flows if f.resource in lids)
        out[lb_id] = m
    if status:
        healthy = sum(1 for tg in status.get("target_groups", {}).values()
                      for t in tg.values() if t["state"] == "healthy")
        unhealthy = sum(1 for tg in status.get("target_groups", {}).values()
                        for t in tg.values() if t["state"] == "unhealthy")
        for m in out.values():
            m["HealthyHostCount"], m["UnHealthyHostCount"] = healthy, unhealthy
    return out
