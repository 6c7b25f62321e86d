"""Exit statuses of hpctl, one place for all commands."""
import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1          # the operation ran and failed (e.g. a test of traffic failed)
    USAGE = 2            # bad flags or config (click also uses 2)
    ENVIRONMENT = 3      # the machine lacks something: not root, no BPF, no headers, no bcc
    NOT_FOUND = 4        # no such lab / gateway / pinned datapath
