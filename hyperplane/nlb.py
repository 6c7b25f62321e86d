"""Writing load balancers into the data path: VIPs, listeners, targets, Maglev tables.

Listener and target slots are found again from the maps themselves, so a restarted agent
keeps the slot numbers that live flows refer to."""
from __future__ import annotations

from dataclasses import dataclass, field

from .codec import be16_to_port, be32_to_ip, ip_to_be32, port_to_be16
from .errors import ConfigError
from .maglev import build_table
from .nlb_config import NlbConfig, TargetGroup

MAGLEV_EMPTY = 0xFFFFFFFF   # bpf/nlb.h (keep in sync)
TARGET_F_ACTIVE = 1         # bpf/structs.h (keep in sync)


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
        self._recover()

    def _recover(self) -> None:
        for k, v in self.dp.table("listeners").items():
            self.state.listener_ids[(be32_to_ip(k.vip), be16_to_port(k.port), k.proto)] = \
                v.listener_id
        targets = self.dp.table("targets")
        for i in range(self.dp.sizes.max_targets):
            t = targets[targets.Key(i)]
            if t.flags & TARGET_F_ACTIVE:
                self.state.target_ids[f"{be32_to_ip(t.ip)}:{be16_to_port(t.port)}"] = i

    # --- slots -------------------------------------------------------------------------
    @staticmethod
    def _free(used, limit: int, what: str) -> int:
        taken = set(used)
        for i in range(limit):
            if i not in taken:
                return i
        raise ConfigError(f"no free {what} slot: this node holds at most {limit}")

    def target_id(self, identity: str) -> int:
        return self.state.target_ids[identity]

    def _set_target(self, tid: int, identity: str, lb_id: int) -> None:
        ip, port = identity.rsplit(":", 1)
        table = self.dp.table("targets")
        v = table.Leaf()
        v.ip, v.port, v.flags, v.lb_id = ip_to_be32(ip), port_to_be16(int(port)), \
            TARGET_F_ACTIVE, lb_id
        table[table.Key(tid)] = v

    # --- apply ---------------------------------------------------------------------------
    def apply(self, cfg: NlbConfig) -> list[str]:
        """Make the maps say what cfg says (health and drain states included). Returns the
        identities of targets that were removed (their flows are deleted)."""
        lbs = {lb.name: lb.lb_id for lb in cfg.load_balancers}
        for lb_id in lbs.values():
            if lb_id >= self.dp.sizes.max_lbs:
                raise ConfigError(f"lb_id {lb_id} is beyond this node's {self.dp.sizes.max_lbs}")
        # targets: every registered target (draining too: their flows continue)
        wanted_targets = {}
        for tg in cfg.target_groups:
            lb_of_tg = next((lbs[l.lb] for l in cfg.listeners if l.target_group == tg.name), 0)
            for t in tg.targets:
                wanted_targets.setdefault(t.identity, lb_of_tg)
        for identity, lb_id in wanted_targets.items():
            if identity not in self.state.target_ids:
                tid = self._free(self.state.target_ids.values(), self.dp.sizes.max_targets,
                                 "target")
                self.state.target_ids[identity] = tid
            self._set_target(self.state.target_ids[identity], identity, lb_id)

        # listeners and VIPs
        listeners, vips = self.dp.table("listeners"), self.dp.table("vips")
        wanted = {}
        for l in cfg.listeners:
            ids = {self.state.listener_ids.get((str(l.vip), l.port, p)) for p in l.ip_protocols}
            ids.discard(None)
            lid = ids.pop() if ids else self._free(
                set(self.state.listener_ids.values()) | {w[0] for w in wanted.values()},
                self.dp.sizes.max_listeners, "listener")
            for p in l.ip_protocols:
                wanted[(str(l.vip), l.port, p)] = (lid, lbs[l.lb], l)
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
        """Delete every flow pinned to target slot tid (both entries)."""
        flows = self.dp.table("flows")
        doomed = [k for k, v in flows.items() if v.kind in (3, 4) and v.target == tid]
        for k in doomed:
            flows.pop(k, None)
        return len(doomed)

    def flows_per_target(self) -> dict[int, int]:
        """Open client->VIP flows per target slot (one batched read, no decoding); a TCP
        flow already closed (FIN both ways or RST) no longer counts, so a drain ends when
        the last connection closes, not when its closing timeout ends."""
        from .flows import NSEC, timeout_s, flow_timeouts, now_ns
        timeouts, now = flow_timeouts(self.dp), now_ns()
        counts: dict[int, int] = {}
        for k, v in self.dp.table("flows").items_lookup_batch():
            if v.kind == 3 and v.tcp_state != 4 and now - v.last_seen_ns <= \
                    timeout_s(timeouts, k.proto, v.tcp_state) * NSEC:
                counts[v.target] = counts.get(v.target, 0) + 1
        return counts

    def packets_per_target(self) -> dict[int, int]:
        table = self.dp.table("target_packets")
        return {tid: int(sum(table[table.Key(tid)])) for tid in self.state.target_ids.values()}
