"""The fleet: cluster store, membership, shuffle shards, flow sync."""
