"""hpctl top's render() from recorded snapshots (tests/unit/top_snapshots/*.json, recorded
with its record.py while traffic crossed a lab) and from made-up extreme ones: at 80x24 and
200x50 every view fills exactly the screen, no line is wider than it, whole values appear
in their rows (nothing is cut mid-cell) and the key numbers are there."""
import json
import pathlib

import pytest
from rich.cells import cell_len

from hyperplane.observe.dashboard import bar, render, render_plain, short, sparkline
from hyperplane.observe.snapshot import (DestinationRow, DropRow, FleetSnapshot, NodeRow,
                                         ResourceRow, TargetRow)

FIXTURES = sorted((pathlib.Path(__file__).parent / "top_snapshots").glob("*.json"))
SIZES = [(80, 24), (200, 50)]
VIEWS = ["nodes", "resources", "drops"]


def load(path) -> FleetSnapshot:
    return FleetSnapshot.from_dict(json.loads(path.read_text()))


def screen(s, view, width, height) -> list[str]:
    lines = render(s, view, width, height).plain.split("\n")
    assert len(lines) == height, f"{view} {width}x{height}: {len(lines)} lines"
    too_wide = [(i, cell_len(line)) for i, line in enumerate(lines) if cell_len(line) > width]
    assert not too_wide, f"{view} {width}x{height}: lines wider than the screen: {too_wide}"
    return lines


def row_of(lines, first: str) -> list[str]:
    """The whitespace-separated cells of the line whose first cell is `first`."""
    rows = [line.split() for line in lines if line.split()[:1] == [first]]
    assert rows, f"no row starts with {first!r}:\n" + "\n".join(lines)
    return rows[0]


def test_fixtures_were_recorded():
    assert len(FIXTURES) >= 2, FIXTURES
    for path in FIXTURES:
        s = load(path)
        assert any(n.here for n in s.nodes), path


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("width,height", SIZES)
def test_nodes_view_fits_and_shows_every_node(path, width, height):
    s = load(path)
    lines = screen(s, "nodes", width, height)
    assert f"{short(s.pps)} pkt/s" in lines[0]
    assert lines[-1].startswith("n:nodes*")           # the keys, on the last line
    for n in s.nodes:
        cells = row_of(lines, n.name)
        if n.here:
            # whole values, in their columns' order: pkt/s, bit/s, active
            assert cells[3:6] == [short(n.pps), short(n.bps), short(n.active_flows)], cells
            assert any(ch in cells[-1] for ch in "▁▂▃▄▅▆▇█"), cells   # the sparkline
    if s.destinations:
        top = s.destinations[0]
        assert row_of(lines, top.destination)[2] == short(top.ports_used)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("width,height", SIZES)
def test_resources_view_shows_each_resource_total(path, width, height):
    s = load(path)
    lines = screen(s, "resources", width, height)
    assert lines[-1].startswith("n:nodes  r:resources*")
    for res in {r.resource for r in s.resources}:
        rs = [r for r in s.resources if r.resource == res]
        cells = row_of(lines, res)
        assert cells[1:4] == [short(sum(r.pps for r in rs)), short(sum(r.bps for r in rs)),
                              short(sum(r.active_flows for r in rs))], cells


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("width,height", SIZES)
def test_drops_view_shows_each_reason(path, width, height):
    s = load(path)
    lines = screen(s, "drops", width, height)
    for reason in {d.reason for d in s.drops}:
        total = sum(d.total for d in s.drops if d.reason == reason)
        assert row_of(lines, reason.removeprefix("DROP_"))[2] == short(total)
    if not s.drops:
        assert "  none" in lines


def crowded() -> FleetSnapshot:
    """More than fits: 40 nodes with long names, 12 resources, 60 drop reasons, long
    destinations, targets unhealthy here and there, two notes."""
    nodes = [NodeRow(f"node-with-a-very-long-name-{i:02d}", here=i % 5 != 0, live=i % 7 != 0,
                     ready=i % 3 != 0, agent="running", pps=1.5e6 * i, bps=9.9e10, lag_ms=1234.5,
                     active_flows=10**7, new_flows_ps=9999.9, drops_ps=0.25,
                     pps_history=[float(j) for j in range(120)]) for i in range(40)]
    resources = [ResourceRow(f"lb:load-balancer-number-{k}", n.name, pps=1e5, bps=1e9,
                             active_flows=5, pps_history=[1.0, 2.0])
                 for k in range(12) for n in nodes[:4]]
    drops = [DropRow(n.name, f"DROP_REASON_NUMBER_{k}", 1.0 * k, 10**9) for k in range(60)
             for n in nodes[:6]]
    dests = [DestinationRow("gateway-with-a-long-name", f"198.18.{k}.{k}:65535/icmp", 64512 - k,
                            64512) for k in range(20)]
    targets = [TargetRow(n.name, "group", f"10.20.{k}.10:8080",
                         "unhealthy" if k % 2 else "healthy") for k in range(10) for n in nodes]
    return FleetSnapshot(taken=1_800_000_000.0, interval_s=1.0, history_step_s=1.0,
                         nodes=nodes, resources=resources, drops=drops, destinations=dests,
                         targets=targets, pps_history=[float(j) for j in range(60)],
                         notes=["the store etcd://10.0.0.1:2379 cannot be read: " + "x" * 300,
                                "second note"])


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("width,height", SIZES + [(40, 10), (300, 100)])
def test_a_crowded_fleet_still_fits(view, width, height):
    lines = screen(crowded(), view, width, height)
    body = "\n".join(lines)
    if height < 100:
        assert "more" in body          # cut rows are counted, not dropped silently
    assert lines[2].startswith("! the store etcd://10.0.0.1:2379")


def test_empty_snapshot_renders():
    s = FleetSnapshot(taken=0.0, interval_s=0.0, history_step_s=1.0)
    for view in VIEWS:
        assert "none" in "\n".join(screen(s, view, 80, 24))


def test_render_is_pure_and_views_have_short_names():
    s = crowded()
    assert render(s, "r", 80, 24).plain == render(s, "resources", 80, 24).plain
    with pytest.raises(ValueError):
        render(s, "x", 80, 24)


def test_plain_output_has_no_padding():
    s = load(FIXTURES[0])
    text = render_plain(s, "nodes", 120)
    assert "\x1b" not in text and text.endswith("\n") and "\n\n\n" not in text
    assert text.splitlines()[-1].startswith("n:nodes*")


def test_short_numbers_fit_six_characters():
    for x in [0, 0.5, 7.25, 9.99, 10, 999, 999.6, 1000, 12345, 999_999, 10**6, 7.891e6, 1.2e9,
              9.99e11, 1e12, 5e14, 3e17]:
        assert len(short(x)) <= 7, (x, short(x))
    assert short(12345) == "12.3k" and short(0) == "0" and short(None) == "-"
    assert short(2_500_000) == "2.50M"


def test_sparkline_and_bar():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0], 4) == "   █"                 # right-aligned, latest last
    assert sparkline(list(range(100)), 10)[-1] == "█"     # the last 10 values
    assert sparkline([0, 0], 3) == " ▁▁"
    assert bar(0.5, 10) == "█████·····" and bar(0, 4) == "····" and bar(1, 4) == "████"
