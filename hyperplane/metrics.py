"""Counters and metrics read from the maps: verdicts, events, per-gateway (AWS names).

Every function takes `dp`, anything with table(name) (a compiled Datapath or a node's
pinned maps, hyperplane/pinned.py)."""
from __future__ import annotations

from .verdicts import FlowKind, Stat, Verdict

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


def _percpu_counts(table, enum_cls) -> dict[str, int]:
    """name -> value summed over CPUs, for each index of a per-CPU counter array (indexes
    the running program's array does not have, from a newer header, read 0)."""
    return {e.name: int(sum(table[table.Key(e)])) if e < table.max_entries else 0
            for e in enum_cls}


def verdict_counts(dp) -> dict[str, int]:
    return _percpu_counts(dp.table("verdicts"), Verdict)


def stat_counts(dp) -> dict[str, int]:
    return _percpu_counts(dp.table("stats"), Stat)


def active_flows(dp, kind: FlowKind) -> dict[int, int]:
    """Open flows per resource: client-side entries of `kind` (NAT_OUT: per gateway id,
    ActiveConnectionCount; NLB_IN: per listener id, ActiveFlowCount) that are live and not
    closed.

    The one place that counts them. Today it reads the flow tables (batched, no decoding);
    when the data path keeps opened/ended counters per resource, only this changes."""
    from .flows import entry_open, flow_entries, flow_timeouts, now_ns
    timeouts, now = flow_timeouts(dp), now_ns()
    counts: dict[int, int] = {}
    for k, v in flow_entries(dp):
        if v.kind == kind and entry_open(k, v, timeouts, now):
            counts[v.resource] = counts.get(v.resource, 0) + 1
    return counts


def gateway_metrics(dp, gw_id: int) -> dict[str, int]:
    """AWS-named metrics of one gateway, summed over CPUs."""
    table = dp.table("gw_stats")
    per_cpu = table[table.Key(gw_id)]
    out = {aws: sum(getattr(cpu, field) for cpu in per_cpu) for field, aws in NAT_METRICS.items()}
    out["ActiveConnectionCount"] = active_flows(dp, FlowKind.NAT_OUT).get(gw_id, 0)
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

    Healthy/UnHealthyHostCount come from the agent's status (the health checks run
    there)."""
    table = dp.table("lb_stats")
    by_lb: dict[int, set] = {}
    for k, v in dp.table("listeners").items():
        by_lb.setdefault(v.lb_id, set()).add(v.listener_id)
    out = {}
    active = active_flows(dp, FlowKind.NLB_IN) if by_lb else {}
    for lb_id, lids in sorted(by_lb.items()):
        m = {aws: 0 for aws in NLB_METRICS.values()}
        for lid in lids:
            for cpu in table[table.Key(lid)]:
                for field, aws in NLB_METRICS.items():
                    m[aws] += getattr(cpu, field)
        m["ActiveFlowCount"] = sum(active.get(lid, 0) for lid in lids)
        out[lb_id] = m
    if status:
        healthy = sum(1 for tg in status.get("target_groups", {}).values()
                      for t in tg.values() if t["state"] == "healthy")
        unhealthy = sum(1 for tg in status.get("target_groups", {}).values()
                        for t in tg.values() if t["state"] == "unhealthy")
        for m in out.values():
            m["HealthyHostCount"], m["UnHealthyHostCount"] = healthy, unhealthy
    return out
