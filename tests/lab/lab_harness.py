"""The lab harness shared by the lab tests and their conftest: a handle on a lab built
with a unique prefix, and how to build one so it is always torn down."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import pytest

from hyperplane import lab, netns
from hyperplane.errors import HyperplaneError

LAB_MODE = os.environ.get("HP_LAB_MODE", "xdp")
ATTACH = os.environ.get("HP_LAB_ATTACH", "auto")   # mode xdp: auto | tc | xdp


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (they create network namespaces and attach XDP); "
                    "run them with sudo, or run only tests/unit", pytrace=False)


def lab_prefix(tag: str) -> str:
    """Unique per test process, so a test lab never touches the user's 'hp' lab."""
    return f"hpt{os.getpid() % 1000}{tag}"


@dataclass
class Lab:
    cfg: lab.LabConfig
    _dp: object = field(default=None, repr=False)
    servers: dict = field(default_factory=dict, repr=False)   # target name -> Popen

    @property
    def mode(self) -> str:
        return self.cfg.mode

    @property
    def client(self) -> str:
        return lab.namespaces(self.cfg)["client"]

    @property
    def node(self) -> str:
        return lab.namespaces(self.cfg)["node"]

    @property
    def inet(self) -> str:
        return lab.namespaces(self.cfg)["inet"]

    @property
    def translated(self) -> bool:
        return self.cfg.mode in ("xdp", "nft")

    @property
    def expected_src(self) -> str:
        """The source address a server in inet should see for client traffic."""
        return lab.NAT_IP if self.translated else lab.CLIENT_IPS[0]

    def forward_packets(self) -> int:
        return lab.forward_packets(self.cfg)

    def arp_received(self, role: str) -> int:
        """ARP packets received on the node's out0 / inet's inet0 (the lab resolves
        neighbours by ARP; the accounting leaves them out of the translated traffic).
        Counted by the nft table build_lab adds (instrumentation only: it accepts all)."""
        return netns.nft_counter(self.ns_of(role), "arp", ARP_TABLE, "arp_in")["packets"]

    def counters(self) -> dict[str, int]:
        """Verdict name -> packets of the lab's node. The node's maps are opened once per
        lab (opening compiles the program, ~1 s) and read again on each call."""
        from hyperplane.node import lifecycle as node
        name = lab.node_name(self.cfg)
        try:
            from hyperplane.observe.metrics import verdict_counts
        except ImportError:
            return node.read_counters(name, pin_root=lab.topology(self.cfg)["node"]["pin_root"])
        if self._dp is None:
            self._dp = node.open_node(name)
        return verdict_counts(self._dp)


    # --- the NLB part ------------------------------------------------------------------
    def ns_of(self, role: str) -> str:
        return lab.namespaces(self.cfg)[role]

    def start_server(self, name: str) -> None:
        self.stop_server(name)
        self.servers[name] = lab.start_target_server(self.cfg, name)

    def stop_server(self, name: str) -> None:
        proc = self.servers.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(10)

    def stop_servers(self) -> None:
        for name in list(self.servers):
            self.stop_server(name)

    @property
    def store(self):
        from hyperplane.fleet.store import open_store
        return open_store(lab.store_path(self.cfg.prefix))

    def agent_status(self) -> dict:
        from hyperplane.node.agent import status_path
        try:
            with open(status_path(lab.node_name(self.cfg))) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return {}

    def target_states(self, group: str = lab.WEB_GROUP) -> dict[str, str]:
        """Target identity ("ip:port") -> state, from the agent's status file."""
        tgs = self.agent_status().get("target_groups", {}).get(group, {})
        return {ident: info.get("state") for ident, info in tgs.items()}

    def wait_states(self, want: dict[str, str | None], group: str = lab.WEB_GROUP,
                    timeout: float = 10.0) -> float:
        """Wait until each target identity in `want` has that state (None: gone from the
        status); returns the seconds it took, raises TimeoutError with the last states."""
        t0 = time.monotonic()
        while True:
            have = self.target_states(group)
            if all(have.get(k) == v for k, v in want.items()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"after {timeout}s the agent reports {have}, wanted {want}")
            time.sleep(0.02)

    def reset_nlb(self) -> None:
        """Put the lab's NLB config back into the store (as `lab up` wrote it)."""
        data = lab.nlb_config(self.cfg).to_dict()
        from hyperplane.fleet.store import NLB_KEY
        self.store.put(NLB_KEY, data)


ARP_TABLE = "hpt_arp"
ARP_IFNAME = {"node": "out0", "inet": "inet0"}   # the link between them


def arp_counting(ifname: str) -> str:
    return f"""table arp {ARP_TABLE} {{
  counter arp_in {{ }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{ifname}" counter name "arp_in"
  }}
}}
"""


def build_lab(request, cfg: lab.LabConfig) -> Lab:
    require_root()
    lab.down(cfg)                       # leftovers of a killed run with the same pid
    request.addfinalizer(lambda: lab.down(cfg))
    lab.up(cfg)
    for role, ifname in ARP_IFNAME.items():
        netns.nft_load(lab.namespaces(cfg)[role], arp_counting(ifname))
    return Lab(cfg)


def build_nlb_lab(request, cfg: lab.LabConfig) -> Lab:
    """A lab with the NLB (mode xdp: store + agent) and a server running on every target;
    waits until the agent reports every target healthy."""
    the_lab = build_lab(request, cfg)
    request.addfinalizer(the_lab.stop_servers)
    for name in lab.TARGET_ROLES:
        the_lab.start_server(name)
    healthy = {f"{ip}:{lab.TARGET_HTTP_PORT}": "healthy" for ip in lab.TARGET_IPS}
    the_lab.wait_states(healthy, timeout=15)
    return the_lab
