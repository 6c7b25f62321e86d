"""The lab harness shared by the lab tests and their conftest: a handle on a lab built
with a unique prefix, and how to build one so it is always torn down."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from hyperplane import lab
from hyperplane.errors import HyperplaneError

LAB_MODE = os.environ.get("HP_LAB_MODE", "xdp")
XDP_MODE = os.environ.get("HP_LAB_XDP_MODE", "generic")


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

    def counters(self) -> dict[str, int]:
        """Verdict name -> packets of the lab's node. The node's maps are opened once per
        lab (opening compiles the program, ~1 s) and read again on each call."""
        from hyperplane import node
        name = lab.node_name(self.cfg)
        try:
            from hyperplane.metrics import verdict_counts
        except ImportError:
            return node.read_counters(name, pin_root=lab.topology(self.cfg)["node"]["pin_root"])
        if self._dp is None:
            self._dp = node.open_node(name)
        return verdict_counts(self._dp)


def build_lab(request, cfg: lab.LabConfig) -> Lab:
    require_root()
    lab.down(cfg)                       # leftovers of a killed run with the same pid
    request.addfinalizer(lambda: lab.down(cfg))
    try:
        lab.up(cfg)
    except HyperplaneError as exc:
        if cfg.mode == "xdp" and "not implemented" in str(exc):
            pytest.skip(f"xdp datapath not available yet ({exc}); "
                        "HP_LAB_MODE=nft checks the harness meanwhile")
        raise
    return Lab(cfg)
