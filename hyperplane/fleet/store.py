"""The cluster store for a one-host deployment: a JSON file, changed under an exclusive
lock so hpctl and the agent never lose each other's writes. (A multi-host cluster uses
etcd behind the same two calls.)"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from typing import Callable

from hyperplane.errors import ConfigError

DEFAULT_STORE = "/run/hyperplane/store/nlb.json"


class Store:
    def __init__(self, path: str = DEFAULT_STORE):
        self.path = path

    @contextmanager
    def _locked(self):
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            lock = open(self.path + ".lock", "a")
        except OSError as exc:
            raise ConfigError(f"cannot use the store {self.path}: {exc.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> dict:
        """The store's content; a store that cannot be read or is not a JSON object (empty,
        truncated, garbage, not UTF-8) is a ConfigError, never a traceback."""
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read the store {self.path}: {exc.strerror}") from None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            raise ConfigError(f"the store {self.path} is not valid JSON ({exc}); fix or "
                              f"remove it") from None
        if not isinstance(data, dict):
            raise ConfigError(f"the store {self.path} must hold a JSON object, not "
                              f"{type(data).__name__}; fix or remove it")
        return data

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
            try:
                with open(tmp, "w") as f:
                    json.dump(new, f, indent=2, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as exc:
                raise ConfigError(f"cannot write the store {self.path}: {exc.strerror}") \
                    from None
            return new
