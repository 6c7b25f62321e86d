"""Counters and metrics read from the maps: verdicts, events, per-gateway (AWS names).

Every function takes `dp`, anything with table(name) (a compiled Datapath or a node's
pinned maps, hyperplane/datapath/pinned.py)."""
from __future__ import annotations

from hyperplane.datapath.verdicts import FlowKind, Stat, Verdict

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


# Our own per-resource metrics (not AWS's), in both gw_metrics and lb_metrics.
OWN_METRICS = {
    "flows_refused": "FlowsRefusedCount",   # new flows refused: a table full (NLB: or the
                                            # tuple taken by another connection)
}


def active_flows(dp, kind: FlowKind, ids=None) -> dict[int, int]:
    """Active flows per resource (NAT_OUT: per gateway id, ActiveConnectionCount; NLB_IN:
    per listener id, ActiveFlowCount), from counters alone: the flow tables are never read.

    active = sum over CPUs of (flows_confirmed - flows_ended) of the resource's gw_stats /
    lb_stats entry, minus user_ends[slot] (confirmed flows user space deleted while open,
    hyperplane.datapath.flows.add_user_ends). A flow counts from its confirmation (the originator's
    packet after a reply: bpf/flow.h flow_should_confirm) until it closes (FIN both ways,
    RST) or is deleted (expired and met by the data path or the GC, reset, its target
    removed); unconfirmed flows do not count. ids: the resources to read (default: every
    slot of the stats map)."""
    from hyperplane.datapath.flows import user_ends_bases
    nat = kind in (FlowKind.NAT_OUT, FlowKind.NAT_IN)
    stats = dp.table("gw_stats" if nat else "lb_stats")
    if ids is None:
        ids = range(stats.max_entries)
    base = user_ends_bases(dp)["nat" if nat else "lb"]
    ends = dp.table("user_ends")
    counts: dict[int, int] = {}
    for rid in ids:
        per_cpu = stats[stats.Key(rid)]
        confirmed = sum(cpu.flows_confirmed for cpu in per_cpu)
        ended = sum(cpu.flows_ended for cpu in per_cpu)
        user = ends[ends.Key(base + rid)]
        # never below 0: a race (the data path ends a flow while user space deletes it)
        # can count one end twice
        counts[rid] = max(0, confirmed - ended - int(getattr(user, "value", user)))
    return counts


def gateway_metrics(dp, gw_id: int) -> dict[str, int]:
    """AWS-named metrics of one gateway (and ours, OWN_METRICS), summed over CPUs."""
    table = dp.table("gw_stats")
    per_cpu = table[table.Key(gw_id)]
    out = {aws: sum(getattr(cpu, field) for cpu in per_cpu)
           for field, aws in {**NAT_METRICS, **OWN_METRICS}.items()}
    out["ActiveConnectionCount"] = active_flows(dp, FlowKind.NAT_OUT, [gw_id])[gw_id]
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
    """AWS-named metrics per load balancer id (and ours, OWN_METRICS), summed over its
    listeners and CPUs.

    Healthy/UnHealthyHostCount come from the agent's status (the health checks run
    there)."""
    table = dp.table("lb_stats")
    by_lb: dict[int, set] = {}
    for k, v in dp.table("listeners").items():
        by_lb.setdefault(v.lb_id, set()).add(v.listener_id)
    out = {}
    fields = {**NLB_METRICS, **OWN_METRICS}
    active = active_flows(dp, FlowKind.NLB_IN, sorted(set().union(*by_lb.values()))) \
        if by_lb else {}
    for lb_id, lids in sorted(by_lb.items()):
        m = {aws: 0 for aws in fields.values()}
        for lid in lids:
            for cpu in table[table.Key(lid)]:
                for field, aws in fields.items():
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


def listener_metrics(dp) -> dict[int, dict]:
    """Per listener row of the data path (one per VIP, port and IP protocol: a TCP_UDP
    listener has two): its vip, port, proto (IP protocol number), lb_id and the AWS-named
    metrics (and ours, OWN_METRICS) summed over CPUs, with ActiveFlowCount from counters.
    Reads the listeners map and one lb_stats entry per listener: never a flow table."""
    from hyperplane.codec import be16_to_port, be32_to_ip
    table = dp.table("lb_stats")
    rows = {v.listener_id: {"vip": be32_to_ip(k.vip), "port": be16_to_port(k.port),
                            "proto": int(k.proto), "lb_id": int(v.lb_id)}
            for k, v in dp.table("listeners").items()}
    active = active_flows(dp, FlowKind.NLB_IN, sorted(rows)) if rows else {}
    fields = {**NLB_METRICS, **OWN_METRICS}
    for lid, row in rows.items():
        per_cpu = table[table.Key(lid)]
        row.update({aws: int(sum(getattr(cpu, field) for cpu in per_cpu))
                    for field, aws in fields.items()})
        row["ActiveFlowCount"] = active[lid]
    return rows
