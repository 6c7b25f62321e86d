"""Fixtures of the packet tests (see bpf_env.py)."""
from bpf_env import _datapaths, e, env, sandbox_ns  # noqa: F401  (pytest fixtures)
