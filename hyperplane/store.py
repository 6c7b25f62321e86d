"""The cluster store for a one-host deployment: a JSON file, changed under an exclusive
lock so hpctl and the agent never lose each other's writes. (A multi-host cluster uses
etcd behind the same two calls.)"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from typing import Callable

from .errors import ConfigError

DEFAULT_STORE = "/run/hyperplane/store/nlb.json"


class Store:
    def __init__(self, path: str = DEFAULT_STORE):
        self.path = path

    @contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the store {self.path} is not valid JSON ({exc}); fix or remove it")

    def read(self) -> dict:
        with self._locked():
            return self._load()

    def mtime_ns(self) -> int:
        try:
            return os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return 0

    def update(self, fn: Callable[[dict], dict]) -> dict:
        """Read, change with fn, write back atomically (rename), all under the lock."""
        with self._locked():
            new = fn(self._load())
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(new, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
            return new
