"""Errors that reach the user as one clear sentence (hpctl prints them without traceback)."""


class HyperplaneError(Exception):
    exit_status = 1


class EnvironmentProblem(HyperplaneError):
    """The machine lacks something (root, BPF, headers, bcc). The message says how to fix it."""
    exit_status = 3


class ConfigError(HyperplaneError):
    """A bad flag, config file or value."""
    exit_status = 2


class NotFound(HyperplaneError):
    exit_status = 4


class StoreError(ConfigError):
    """The cluster store cannot be reached, read or parsed, or refused a request
    (hyperplane.fleet.store). The message names the store and what to do."""
