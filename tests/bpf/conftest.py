"""Fixtures of the packet tests (see bpf_env.py)."""
from bpf_env import e, env, sandbox_ns  # noqa: F401  (pytest fixtures)
