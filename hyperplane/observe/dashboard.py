"""hpctl top's screen: render(snapshot, view, width, height), a pure function of a
FleetSnapshot (hyperplane.observe.snapshot) to rich Text of at most `height` lines of at
most `width` cells.

Tables fit the width by leaving out their least important columns (never by wrapping);
a name longer than its column ends in "…"; numbers are short (12.3k) so they always fit
their column. Sections that do not fit the height show their first rows and "… N more".
Views: nodes (n), resources (r), drops (d)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from rich.text import Text

from hyperplane.observe.snapshot import FleetSnapshot

VIEWS = {"n": "nodes", "r": "resources", "d": "drops"}
SPARKS = "▁▂▃▄▅▆▇█"
GAP = 1          # spaces between two columns


# --- numbers --------------------------------------------------------------------------------

def short(x: float | int | None) -> str:
    """A number in at most 6 characters: 0, 7.5, 999, 12.3k, 456k, 7.89M, 1.20G."""
    if x is None:
        return "-"
    x = float(x)
    if x < 0:
        return "-" + short(-x)
    if x < 10 and round(x, 1) != round(x):
        return f"{x:.1f}"
    if round(x) < 1000:
        return f"{x:.0f}"
    for scale, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        v = x / scale
        for digits, below in ((2, 10), (1, 100), (0, 1000)):
            if round(v, digits) < below:
                return f"{v:.{digits}f}{unit}"
    return f"{x:.0e}"


def sparkline(values: list[float], width: int) -> str:
    """The last `width` values as block characters, scaled to their maximum, right-aligned
    (exactly `width` characters)."""
    if width <= 0:
        return ""
    vals = list(values)[-width:]
    top = max(vals, default=0.0)
    if top <= 0:
        line = SPARKS[0] * len(vals)
    else:
        line = "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))]
                       for v in vals)
    return line.rjust(width)


def fit(text: str, width: int) -> str:
    """text in `width` cells: cut with "…" when longer."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[:width - 1] + "…"


def fit_middle(text: str, width: int) -> str:
    """text in `width` cells, a long one cut in the middle (names that differ only at the
    end, node-a-long-name-01 and -02, stay apart)."""
    if len(text) <= width or width < 5:
        return fit(text, width)
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "…" + text[len(text) - tail:]


# --- tables ---------------------------------------------------------------------------------

@dataclass
class Col:
    title: str
    width: int = 0           # 0: as wide as its widest cell (at most `cap`)
    right: bool = True       # numbers right-aligned
    priority: int = 5        # the columns that fit a narrow screen: lowest first
    cap: int = 24
    kind: str = "text"       # "spark" (a list of values) or "bar" (a share 0..1): at
                             # least `width` cells, more when there is room (up to `cap`)


def _layout(cols: list[Col], rows: list[list], width: int) -> list[tuple[int, int]]:
    """(column index, width) of the columns shown, in their order: the most important ones
    that fit; a spark or bar column, if it fits at its least width, then takes what is left
    (up to its cap)."""
    widths = {}
    for i, c in enumerate(cols):
        if c.kind != "text":
            widths[i] = max(c.width, len(c.title))
            continue
        cells = [len(str(r[i])) for r in rows]
        widths[i] = c.width or min(c.cap, max([len(c.title), *cells]))
    used, chosen = 0, []
    for i in sorted(widths, key=lambda i: (cols[i].priority, i)):
        need = widths[i] + (GAP if chosen else 0)
        if used + need <= width:
            chosen.append(i)
            used += need
    for i in chosen:
        if cols[i].kind != "text":
            grow = min(cols[i].cap - widths[i], width - used)
            if grow > 0:
                widths[i] += grow
                used += grow
    return [(i, widths[i]) for i in sorted(chosen)]


def bar(share: float, width: int) -> str:
    """share (0..1) of width cells as a bar, in eighths of a cell, padded with dots."""
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")
    return text + "·" * (width - len(text))


def _cell(col: Col, value, w: int) -> str:
    if col.kind == "spark":
        return sparkline(value, w)
    if col.kind == "bar":
        return bar(value, w)
    if col.right:
        return fit(str(value), w).rjust(w)
    return fit_middle(str(value), w).ljust(w)


def table(title: str, cols: list[Col], rows: list[list], width: int, max_lines: int,
          styles: list[str | None] | None = None) -> list[Text]:
    """A title line, a header and the rows, in at most max_lines lines (at least 3 are
    needed to show a row: fewer rows than given end in "… N more")."""
    if max_lines <= 0:
        return []
    lines = [Text(fit(title, width), style="bold")]
    if not rows or max_lines < 4 and len(rows) > max_lines - 2:   # no room for a row
        if max_lines >= 2:
            lines.append(Text(fit(f"  … {len(rows)} rows" if rows else "  none", width),
                              style="dim"))
        return lines[:max_lines]
    shown = _layout(cols, rows, width)
    lines.append(Text(" ".join(_cell(Col(cols[i].title, right=cols[i].right), cols[i].title, w)
                               for i, w in shown), style="dim"))
    room = max_lines - 2
    cut = len(rows) > room
    keep = rows[:room - 1] if cut else rows
    for j, row in enumerate(keep):
        lines.append(Text(" ".join(_cell(cols[i], row[i], w) for i, w in shown),
                          style=(styles[j] if styles else None) or ""))
    if cut:
        lines.append(Text(fit(f"  … {len(rows) - len(keep)} more", width), style="dim"))
    return lines


# --- sections -------------------------------------------------------------------------------

def _minute(s: FleetSnapshot) -> int:
    """Samples in a minute: a sparkline's widest (one cell per sample)."""
    return max(8, min(240, round(60 / s.history_step_s))) if s.history_step_s > 0 else 60


def _yes(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "no"


def nodes_section(s: FleetSnapshot, width: int, lines: int) -> list[Text]:
    cols = [Col("node", right=False, priority=0, cap=20), Col("live", priority=3),
            Col("ready", priority=2), Col("pkt/s", 6, priority=0), Col("bit/s", 6, priority=1),
            Col("active", 6, priority=1), Col("new/s", 6, priority=2),
            Col("drop/s", 6, priority=1), Col("lag ms", 6, priority=2),
            Col("agent", right=False, priority=6, cap=11),
            Col("last minute", 8, priority=3, kind="spark", cap=_minute(s))]
    rows, styles = [], []
    for n in s.nodes:
        if not n.here:
            rows.append([n.name, _yes(n.live), _yes(n.ready), "-", "-", "-", "-", "-", "-",
                         n.agent, []])
        else:
            rows.append([n.name, _yes(n.live), _yes(n.ready), short(n.pps), short(n.bps),
                         short(n.active_flows), short(n.new_flows_ps), short(n.drops_ps),
                         "-" if n.lag_ms is None else short(round(n.lag_ms)),
                         "error" if n.error else n.agent, n.pps_history])
        styles.append("red" if n.error or n.live is False else
                      "yellow" if n.ready is False else None)
    return table(f"nodes ({len(s.nodes)})", cols, rows, width, lines, styles)


def destinations_section(s: FleetSnapshot, width: int, lines: int) -> list[Text]:
    cols = [Col("destination", right=False, priority=0, cap=28),
            Col("gateway", right=False, priority=3, cap=16), Col("ports", 6, priority=0),
            Col("of", 6, priority=2), Col("use %", 6, priority=1),
            Col("use", 6, priority=4, kind="bar", cap=30)]
    rows = []
    for d in s.destinations:
        share = d.ports_used / d.ports_total if d.ports_total else 0.0
        rows.append([d.destination, d.gateway, short(d.ports_used), short(d.ports_total),
                     f"{100 * share:.1f}", share])
    return table("NAT ports in use per destination (hottest first)", cols, rows, width, lines)


def targets_section(s: FleetSnapshot, width: int, lines: int) -> list[Text]:
    """Each target once: how many nodes' health checks find it healthy, its flows."""
    by_target: dict[tuple[str, str], list] = {}
    for t in s.targets:
        by_target.setdefault((t.group, t.target), []).append(t)
    cols = [Col("group", right=False, priority=2, cap=16),
            Col("target", right=False, priority=0, cap=24), Col("healthy", priority=0),
            Col("flows", 6, priority=1), Col("not healthy on", right=False, priority=3, cap=40)]
    rows, styles = [], []
    for (group, target), ts in sorted(by_target.items()):
        healthy = sum(1 for t in ts if t.state == "healthy")
        rows.append([group, target, f"{healthy}/{len(ts)}", short(sum(t.active_flows for t in ts)),
                     ", ".join(f"{t.node} ({t.state})" for t in ts if t.state != "healthy")
                     or "-"])
        styles.append(None if healthy == len(ts) else "red" if healthy == 0 else "yellow")
    return table("targets (health as each node's agent sees it)", cols, rows, width, lines,
                 styles)


def resources_section(s: FleetSnapshot, width: int, lines: int) -> list[Text]:
    cols = [Col("resource / node", right=False, priority=0, cap=28), Col("pkt/s", 6, priority=0),
            Col("bit/s", 6, priority=1), Col("active", 6, priority=1),
            Col("new/s", 6, priority=2), Col("drop/s", 6, priority=1),
            Col("port err", 8, priority=3),
            Col("last minute", 8, priority=2, kind="spark", cap=_minute(s))]
    by_res: dict[str, list] = {}
    for r in s.resources:
        by_res.setdefault(r.resource, []).append(r)
    rows, styles = [], []
    for res, rs in sorted(by_res.items()):
        hist_len = max(len(r.pps_history) for r in rs)
        total_hist = [sum(r.pps_history[i - hist_len + len(r.pps_history)]
                          for r in rs if i - hist_len + len(r.pps_history) >= 0)
                      for i in range(hist_len)]
        rows.append([res, short(sum(r.pps for r in rs)), short(sum(r.bps for r in rs)),
                     short(sum(r.active_flows for r in rs)),
                     short(sum(r.new_flows_ps for r in rs)), short(sum(r.drops_ps for r in rs)),
                     short(sum(r.port_alloc_errors for r in rs)), total_hist])
        styles.append("bold")
        for r in rs:
            rows.append([f"  {r.node}", short(r.pps), short(r.bps), short(r.active_flows),
                         short(r.new_flows_ps), short(r.drops_ps), short(r.port_alloc_errors),
                         r.pps_history])
            styles.append(None)
    return table(f"resources ({len(by_res)}): the fleet, then each node", cols, rows, width,
                 lines, styles)


def drops_section(s: FleetSnapshot, width: int, lines: int) -> list[Text]:
    nodes = sorted({d.node for d in s.drops})
    reasons = sorted({d.reason for d in s.drops})
    per = {(d.node, d.reason): d for d in s.drops}
    cols = [Col("reason", right=False, priority=0, cap=24), Col("fleet/s", 7, priority=0),
            Col("total", 7, priority=1)] + \
        [Col(f"{n}/s", priority=4 + i, cap=20) for i, n in enumerate(nodes)]
    rows = []
    for reason in sorted(reasons, key=lambda r: -sum(d.per_s for d in s.drops if d.reason == r)):
        ds = [per.get((n, reason)) for n in nodes]
        rows.append([reason.removeprefix("DROP_"),
                     short(sum(d.per_s for d in ds if d)), short(sum(d.total for d in ds if d)),
                     *[short(d.per_s) if d else "-" for d in ds]])
    return table(f"drops by reason ({len(nodes)} node(s) with drops)", cols, rows, width,
                 lines)


# --- the screen -----------------------------------------------------------------------------

def _header(s: FleetSnapshot, view: str, width: int) -> list[Text]:
    here = [n for n in s.nodes if n.here]
    parts = [f"hpctl top: {len(s.nodes)} node{'' if len(s.nodes) == 1 else 's'}",
             f"{sum(1 for n in s.nodes if n.live)} live",
             f"{sum(1 for n in s.nodes if n.ready)} ready",
             f"{short(s.pps)} pkt/s", f"{short(s.bps)} bit/s",
             f"{short(s.active_flows)} active", f"{short(s.new_flows_ps)} new/s",
             f"{short(s.drops_ps)} drop/s"]
    if len(here) != len(s.nodes):
        parts.insert(1, f"{len(here)} here")
    line = parts[0]
    for p in parts[1:]:
        if len(line) + 2 + len(p) > width:
            break
        line += ", " + p
    label = f"fleet pkt/s, last {len(s.pps_history) * s.history_step_s:.0f} s: "
    tail = f" max {short(max(s.pps_history, default=0))}"
    room = width - len(label) - len(tail)
    spark = Text(fit(label, width), style="dim")
    if room >= 4:
        spark.append(sparkline(s.pps_history, min(room, _minute(s))), style="green")
        spark.append(tail, style="dim")
    return [Text(line, style="bold"), spark]


def _footer(s: FleetSnapshot, view: str, width: int) -> Text:
    keys = "  ".join(f"{k}:{v}" + ("*" if v == view else "") for k, v in VIEWS.items())
    clock = time.strftime("%H:%M:%S", time.localtime(s.taken))
    text = f"{keys}  q:quit  {clock}, rates over {s.interval_s:.1f} s"
    return Text(fit(text, width), style="reverse")


def _stack(sections: list, width: int, lines: int) -> list[Text]:
    """Sections one under the other with a blank line between; each first gets a line for
    its title and up to 3 rows, the rest goes to them in order."""
    out: list[Text] = []
    for k, make in enumerate(sections):
        gap = 1 if out else 0
        later = sum(1 + 1 + 3 for _ in sections[k + 1:])   # what the next ones want at least
        room = lines - len(out) - gap
        if room <= 0:
            break
        budget = max(min(room, 5), room - later)
        part = make(width, budget)
        if part:
            out += [Text("")] * gap + part
    return out[:lines]


def render(s: FleetSnapshot, view: str = "nodes", width: int = 80, height: int = 24, *,
           fill: bool = True) -> Text:
    """The screen for `view` (nodes, resources or drops) in width x height cells (fill:
    blank lines keep the key line at the bottom)."""
    if view in VIEWS:
        view = VIEWS[view]
    if view not in VIEWS.values():
        raise ValueError(f"unknown view {view!r}: one of {', '.join(VIEWS.values())}")
    width, height = max(20, width), max(4, height)
    top = _header(s, view, width)
    notes = [Text(fit("! " + n, width), style="yellow") for n in s.notes[:2]]
    body_lines = height - len(top) - len(notes) - 1
    if view == "nodes":
        sections = [lambda w, n: nodes_section(s, w, n),
                    lambda w, n: destinations_section(s, w, n),
                    lambda w, n: targets_section(s, w, n)]
    elif view == "resources":
        sections = [lambda w, n: resources_section(s, w, n),
                    lambda w, n: targets_section(s, w, n)]
    else:
        sections = [lambda w, n: drops_section(s, w, n)]
    body = _stack(sections, width, body_lines)
    if fill:
        body += [Text("")] * (body_lines - len(body))
    lines = [*top, *notes, *body, _footer(s, view, width)]
    return Text("\n").join(lines[:height])


def render_plain(s: FleetSnapshot, view: str = "nodes", width: int = 120,
                 height: int = 200) -> str:
    """The screen as plain text, no padding (stdout is not a terminal)."""
    text = render(s, view, width, height, fill=False).plain
    return "\n".join(line.rstrip() for line in text.split("\n")) + "\n"
