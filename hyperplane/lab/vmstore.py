"""What the multi-node Vagrant lab's node VMs run against the fleet's cluster store
(hyperplane.lab.vmplan writes these commands into their provisioning scripts):

    python -m hyperplane.lab.vmstore put URL  < records.json   # the store's VM, once
    python -m hyperplane.lab.vmstore wait URL --key /nat --timeout S   # every node

`put` writes each key of a JSON object ({"/nat": ..., "/nlb": ...}: the records the
namespace fleet lab writes, fleet_build.fleet_records, computed on the host from the plan)
into the store; `wait` returns once the store answers and holds every key (the node VMs are
provisioned side by side: a node must not start before the store VM has written them).
Exit 0 on success, 1 (with one sentence on stderr) otherwise."""
from __future__ import annotations

import argparse
import json
import sys
import time

from hyperplane.errors import ConfigError, HyperplaneError

POLL_S = 2.0


def put_records(url: str, records: dict) -> list[str]:
    """Write the records (key -> JSON value) into the store; returns the keys written."""
    if not isinstance(records, dict) or not records \
            or not all(isinstance(k, str) and k.startswith("/") for k in records):
        raise ConfigError("the records must be a JSON object of store keys (\"/nat\", ...)")
    from hyperplane.fleet.store import open_store
    with open_store(url) as store:
        for key, value in records.items():
            store.put(key, value)
    return list(records)


def wait_store(url: str, keys: list[str], timeout_s: float, poll_s: float = POLL_S) -> float:
    """Poll until the store answers and holds every key; returns the seconds it took.
    HyperplaneError when it did not within timeout_s (with the last error or the keys
    still missing)."""
    from hyperplane.fleet.store import open_store
    t0 = time.monotonic()
    why = "no answer yet"
    while True:
        try:
            with open_store(url) as store:
                missing = [k for k in keys if store.get(k) is None]
            if not missing:
                return time.monotonic() - t0
            why = f"{', '.join(missing)} not written yet"
        except Exception as exc:  # noqa: BLE001  (a store not up yet: try again)
            why = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - t0 > timeout_s:
            raise HyperplaneError(f"the store {url} was not ready within {timeout_s:.0f} s "
                                  f"({why})")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperplane.lab.vmstore",
                                 description="The Vagrant lab's cluster store records.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    put = sub.add_parser("put", help="write the JSON object on stdin (key -> value)")
    put.add_argument("url")
    wait = sub.add_parser("wait", help="wait until the store holds the keys")
    wait.add_argument("url")
    wait.add_argument("--key", action="append", required=True, dest="keys")
    wait.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "put":
            try:
                records = json.load(sys.stdin)
            except ValueError as exc:
                raise ConfigError(f"the records on stdin are not JSON: {exc}") from None
            keys = put_records(args.url, records)
            print(f"vmstore: {', '.join(keys)} written to {args.url}", file=sys.stderr)
        else:
            took = wait_store(args.url, args.keys, args.timeout)
            print(f"vmstore: {args.url} holds {', '.join(args.keys)} (waited {took:.0f} s)",
                  file=sys.stderr)
    except HyperplaneError as exc:
        print(f"vmstore: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
