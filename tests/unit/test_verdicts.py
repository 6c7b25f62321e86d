"""The Python enums mirror bpf/consts.h exactly (Cilium-style: defined once in C)."""
import re
from pathlib import Path

import pytest

from hyperplane import verdicts

CONSTS = Path(__file__).resolve().parents[2] / "bpf" / "consts.h"


def c_enum(prefix: str) -> dict[str, int]:
    text = CONSTS.read_text()
    found = {m.group(1): int(m.group(2))
             for m in re.finditer(rf"\b{re.escape(prefix)}(\w+)\s*=\s*(\d+)", text)}
    # TCP_S_ and TO_ share letters with other names only by prefix; drop *_MAX sentinels
    return {k: v for k, v in found.items() if k != "MAX"}


@pytest.mark.parametrize("enum_cls", list(verdicts.C_PREFIXES))
def test_python_enum_matches_c(enum_cls):
    prefix = verdicts.C_PREFIXES[enum_cls]
    c = c_enum(prefix)
    py = {m.name: m.value for m in enum_cls}
    assert c, f"no {prefix}* enumerators found in {CONSTS}"
    assert py == c, f"{enum_cls.__name__} differs from {prefix}* in consts.h"


def test_v_max_matches_c():
    m = re.search(r"\bV_MAX\s*=\s*(\d+)", CONSTS.read_text())
    assert int(m.group(1)) == verdicts.V_MAX == len(verdicts.Verdict)


def test_every_verdict_has_one_action():
    actions = {v.action for v in verdicts.Verdict}
    assert actions == {"XDP_REDIRECT", "XDP_TX", "XDP_PASS", "XDP_DROP"}
    assert verdicts.Verdict.TX_RST.action == "XDP_TX"
    assert verdicts.Verdict.DROP_NO_FLOW.action == "XDP_DROP"
