"""Writing load balancers into the data path: VIPs, listeners, targets (and their
endpoints), Maglev tables.

Listener and target slots are found again from the maps themselves, so a restarted agent
keeps the slot numbers that live flows refer to."""
from __future__ import annotations

from dataclasses import dataclass, field

from hyperplane.codec import be16_to_port, be32_to_ip, ip_to_be32, port_to_be16
from hyperplane.errors import ConfigError
from hyperplane.nlb.maglev import build_table
from hyperplane.nlb.config import NlbConfig, TargetGroup
from hyperplane.datapath.verdicts import MAGLEV_EMPTY, FlowKind, TargetFlag

NLB_KINDS = (FlowKind.NLB_IN, FlowKind.NLB_OUT)   # both entries of an NLB flow


def check_fits(cfg: NlbConfig, sizes, nat_ips=()) -> None:
    """What one node can hold (hyperplane.loader.Sizes): lb ids within its load balancer
    slots, listeners (a TCP_UDP one counts twice in the listener map) and targets within
    its maps; and no VIP that is one of the node's NAT IPs."""
    for lb in cfg.load_balancers:
        if lb.lb_id >= sizes.max_lbs:
            raise ConfigError(f"Load balancer {lb.name!r}: lb_id {lb.lb_id} is beyond this "
                              f"node's {sizes.max_lbs} load balancer slots "
                              f"(0-{sizes.max_lbs - 1}).")
    keys = sum(len(listener.ip_protocols) for listener in cfg.listeners)
    if keys > sizes.max_listeners:
        raise ConfigError(f"{len(cfg.listeners)} listeners need {keys} listener slots (a "
                          f"TCP_UDP one takes two); this node has {sizes.max_listeners}.")
    targets = {t.identity for tg in cfg.target_groups for t in tg.targets}
    if len(targets) > sizes.max_targets:
        raise ConfigError(f"{len(targets)} targets are registered; this node holds at most "
                          f"{sizes.max_targets}.")
    nat_ips = set(nat_ips)
    for listener in cfg.listeners:
        if str(listener.vip) in nat_ips:
            raise ConfigError(f"Listener {listener.vip}:{listener.port}: the VIP is a NAT IP "
                              f"of this node; a VIP and a NAT IP must differ.")


@dataclass
class AppliedState:
    listener_ids: dict = field(default_factory=dict)   # (vip, port, proto) -> listener id
    target_ids: dict = field(default_factory=dict)     # "ip:port" -> target slot
    rows: dict = field(default_factory=dict)           # listener id -> Maglev row (tuple)


class NlbDataplane:
    def __init__(self, dp):
        self.dp = dp
        self.size = dp.sizes.maglev_size
        self.state = AppliedState()
        self._rows_by_targets: dict = {}
        # target_endpoints as written: (ip, port) in network byte order -> target slot
        self._endpoints: dict[tuple[int, int], int] = {}
        self._recover()

    def _recover(self) -> None:
        for k, v in self.dp.table("listeners").items():
            self.state.listener_ids[(be32_to_ip(k.vip), be16_to_port(k.port), k.proto)] = \
                v.listener_id
        targets = self.dp.table("targets")
        for i in range(self.dp.sizes.max_targets):
            t = targets[targets.Key(i)]
            if t.flags & TargetFlag.ACTIVE:
                self.state.target_ids[f"{be32_to_ip(t.ip)}:{be16_to_port(t.port)}"] = i
        self._endpoints = {(k.ip, k.port): int(getattr(v, "value", v))
                           for k, v in self.dp.table("target_endpoints").items()}

    # --- slots -------------------------------------------------------------------------
    @staticmethod
    def _free(used, limit: int, n: int, what: str) -> list[int]:
        """n free slots below limit. A slot still used by something this change removes
        is not free yet: its Maglev row or listener keys still point at it until the
        change is written."""
        taken = set(used)
        free = [i for i in range(limit) if i not in taken][:n]
        if len(free) < n:
            raise ConfigError(f"This node has no free {what} slot ({limit} in all, "
                              f"{len(taken)} in use); slots of {what}s being removed are "
                              f"free once that removal has been applied.")
        return free

    def target_id(self, identity: str) -> int:
        return self.state.target_ids[identity]

    def _set_target(self, tid: int, identity: str, lb_id: int) -> None:
        ip, port = identity.rsplit(":", 1)
        table = self.dp.table("targets")
        v = table.Leaf()
        v.ip, v.port, v.flags, v.lb_id = ip_to_be32(ip), port_to_be16(int(port)), \
            int(TargetFlag.ACTIVE), lb_id
        table[table.Key(tid)] = v

    @staticmethod
    def _endpoint(identity: str) -> tuple[int, int]:
        ip, port = identity.rsplit(":", 1)
        return ip_to_be32(ip), port_to_be16(int(port))

    def _sync_endpoints(self, wanted: dict[tuple[int, int], int], *, remove: bool) -> None:
        """Write `wanted` (endpoint -> target slot) into target_endpoints and, with remove,
        delete every other entry: the data path drops a packet from a registered target
        endpoint that has no flow, so a target's private source never leaves the node
        untranslated. Only changes are written."""
        table = self.dp.table("target_endpoints")
        for ep in [ep for ep in self._endpoints if remove and ep not in wanted]:
            k = table.Key()
            k.ip, k.port = ep
            table.pop(k, None)
            del self._endpoints[ep]
        for ep, tid in wanted.items():
            if self._endpoints.get(ep) != tid:
                k = table.Key()
                k.ip, k.port = ep
                table[k] = table.Leaf(tid)
                self._endpoints[ep] = tid

    # --- apply ---------------------------------------------------------------------------
    def plan(self, cfg: NlbConfig) -> tuple[dict, dict]:
        """The slots cfg needs on this node, or a ConfigError: nothing is written, so a
        config that does not fit leaves the maps as they are. Returns (target identity ->
        (slot, lb_id), listener key (vip, port, proto) -> (listener id, lb_id, Listener))."""
        check_fits(cfg, self.dp.sizes)
        lbs = {lb.name: lb.lb_id for lb in cfg.load_balancers}
        # targets: every registered target (draining too: their flows continue)
        lb_of = {}
        for tg in cfg.target_groups:
            lb_of_tg = next((lbs[l.lb] for l in cfg.listeners if l.target_group == tg.name), 0)
            for t in tg.targets:
                lb_of.setdefault(t.identity, lb_of_tg)
        new = [i for i in lb_of if i not in self.state.target_ids]
        slots = dict(zip(new, self._free(self.state.target_ids.values(),
                                         self.dp.sizes.max_targets, len(new), "target")))
        targets = {i: (self.state.target_ids.get(i, slots.get(i)), lb_id)
                   for i, lb_id in lb_of.items()}
        # listeners: one id per listener (both protocols of a TCP_UDP one share it)
        ids, fresh = {}, []
        for n, l in enumerate(cfg.listeners):
            old = {self.state.listener_ids.get((str(l.vip), l.port, p))
                   for p in l.ip_protocols} - {None}
            if old:
                ids[n] = old.pop()
            else:
                fresh.append(n)
        for n, lid in zip(fresh, self._free(self.state.listener_ids.values(),
                                            self.dp.sizes.max_listeners, len(fresh),
                                            "listener")):
            ids[n] = lid
        listeners = {(str(l.vip), l.port, p): (ids[n], lbs[l.lb], l)
                     for n, l in enumerate(cfg.listeners) for p in l.ip_protocols}
        return targets, listeners

    def apply(self, cfg: NlbConfig) -> list[str]:
        """Make the maps say what cfg says (health and drain states included). Returns the
        identities of targets that were removed (their flows are deleted). A config that
        does not fit the node raises a ConfigError before anything is written."""
        wanted_targets, wanted = self.plan(cfg)
        for identity, (tid, lb_id) in wanted_targets.items():
            self.state.target_ids[identity] = tid
            self._set_target(tid, identity, lb_id)
        # every registered target's endpoint (active, draining or unhealthy) before any
        # flow can reach it; those of targets being removed stay until their flows are gone
        endpoints = {self._endpoint(i): tid for i, (tid, _) in wanted_targets.items()}
        self._sync_endpoints(endpoints, remove=False)

        # listeners and VIPs
        listeners, vips = self.dp.table("listeners"), self.dp.table("vips")
        for key, (lid, lb_id, _) in wanted.items():
            k = listeners.Key()
            k.vip, k.port, k.proto = ip_to_be32(key[0]), port_to_be16(key[1]), key[2]
            v = listeners.Leaf()
            v.listener_id, v.lb_id = lid, lb_id
            listeners[k] = v
            vv = vips.Leaf()
            vv.lb_id = lb_id
            vips[vips.Key(ip_to_be32(key[0]))] = vv
        for key in set(self.state.listener_ids) - set(wanted):
            k = listeners.Key()
            k.vip, k.port, k.proto = ip_to_be32(key[0]), port_to_be16(key[1]), key[2]
            listeners.pop(k, None)
        for vip in {k[0] for k in self.state.listener_ids} - {k[0] for k in wanted}:
            vips.pop(vips.Key(ip_to_be32(vip)), None)
        self.state.listener_ids = {k: v[0] for k, v in wanted.items()}

        # Maglev rows, written only when they change
        for lid, tg in {v[0]: cfg.target_group(v[2].target_group) for v in wanted.values()}.items():
            self._write_row(lid, self._row(tg))

        # targets no longer registered anywhere: forget them and their flows
        removed = [i for i in self.state.target_ids if i not in wanted_targets]
        for identity in removed:
            tid = self.state.target_ids.pop(identity)
            self.delete_flows_of(tid)
            table = self.dp.table("targets")
            table[table.Key(tid)] = table.Leaf()
        self._sync_endpoints(endpoints, remove=True)  # removed targets' endpoints go last
        return removed

    def _row(self, tg: TargetGroup) -> tuple:
        """The Maglev row of a target group, rebuilt only when its routable targets,
        weights or slots change (the agent asks every tick)."""
        backends = tuple(tg.maglev_backends())
        tids = tuple(self.state.target_ids[t.identity] for t in tg.targets)
        key = (backends, tids)
        cached = self._rows_by_targets.get(key)
        if cached is None:
            entries = build_table(backends, self.size) if backends else [-1] * self.size
            cached = tuple(MAGLEV_EMPTY if e < 0 else tids[e] for e in entries)
            if len(self._rows_by_targets) > 64:
                self._rows_by_targets.clear()
            self._rows_by_targets[key] = cached
        return cached

    def _write_row(self, lid: int, row: tuple) -> None:
        if self.state.rows.get(lid) == row:
            return
        table = self.dp.table("maglev")
        n = len(row)
        keys = (table.Key * n)(*range(lid * n, lid * n + n))
        values = (table.Leaf * n)(*row)
        table.items_update_batch(keys, values)
        self.state.rows[lid] = row

    # --- flows -------------------------------------------------------------------------
    def delete_flows_of(self, tid: int) -> int:
        """Delete every flow pinned to target slot tid (both entries, confirmed or not), in
        every flow table; the open confirmed ones are counted as ended (user_ends), so
        ActiveFlowCount drops with them. Returns the flows deleted (original entries)."""
        from hyperplane.datapath.flows import delete_flow_entries, node_flow_tables
        flows = 0
        for name in node_flow_tables(self.dp):
            doomed = [(k, v) for k, v in self.dp.table(name).items_lookup_batch()
                      if v.kind in NLB_KINDS and v.target == tid]
            flows += sum(1 for v in delete_flow_entries(self.dp, name, doomed)
                         if v.kind == FlowKind.NLB_IN)
        return flows

    def flows_per_target(self) -> dict[int, int]:
        """Open client->VIP flows per target slot, confirmed or not (one batched read per
        flow table, no decoding); a TCP flow already closed (FIN both ways or RST) no longer
        counts, so a drain ends when the last connection closes, not when its closing
        timeout ends."""
        from hyperplane.datapath.flows import entry_open, flow_entries, flow_timeouts, now_ns
        timeouts, now = flow_timeouts(self.dp), now_ns()
        counts: dict[int, int] = {}
        for k, v in flow_entries(self.dp):
            if v.kind == FlowKind.NLB_IN and entry_open(k, v, timeouts, now):
                counts[v.target] = counts.get(v.target, 0) + 1
        return counts

    def packets_per_target(self) -> dict[int, int]:
        table = self.dp.table("target_packets")
        return {tid: int(sum(table[table.Key(tid)])) for tid in self.state.target_ids.values()}
