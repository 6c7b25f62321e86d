"""Record a FleetSnapshot of the nodes running on this host as a JSON fixture for
test_dashboard_render.py (run as root while traffic crosses a lab):

    sudo .venv/bin/python tests/unit/top_snapshots/record.py OUT.json \
        [--node NAME ...] [--store URL] [--frames 30] [--interval 1.0]

It samples `frames` times, `interval` seconds apart (so the sparklines hold that much
history), and writes the last snapshot."""
import argparse
import json
import time

from hyperplane.observe.collect import FleetCollector


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--node", action="append", default=None, help="only this node (repeatable)")
    ap.add_argument("--store", default=None)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    collector = FleetCollector(args.node, args.store, step_s=args.interval)
    snap = collector.sample()
    for _ in range(args.frames - 1):
        time.sleep(args.interval)
        snap = collector.sample()
    with open(args.out, "w") as f:
        json.dump(snap.to_dict(), f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
