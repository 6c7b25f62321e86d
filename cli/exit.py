"""Exit statuses of hpctl: one set for every command (README, "Exit codes").

| status | name        | when |
|--------|-------------|------|
| 0      | OK          | done |
| 1      | FAILURE     | it ran and what it checks is not well: a test of traffic failed, an agent is not running (`fleet status`, `lb health`), the store has damaged content |
| 2      | USAGE       | a user mistake: unknown command or flag, a bad value, a bad config file, a store URL that is not one, a store that cannot be reached |
| 3      | ENVIRONMENT | the machine lacks something: not root, no BPF, no kernel headers, no bcc; or a broken installation |
| 4      | NOT_FOUND   | no such node, lab, agent status, gateway, flow log or fleet node |
| 130    | INTERRUPTED | Ctrl-C |

`hpctl lab exec` exits with its command's status instead. Every failure prints one
sentence on stderr starting "hpctl: " (or click's "Usage: ... Error: ..." for a bad flag),
never a traceback: hyperplane.errors' classes carry these statuses (ConfigError 2,
EnvironmentProblem 3, NotFound 4, any other HyperplaneError 1) and cli/main.py prints them."""
import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1          # the operation ran and failed (e.g. a test of traffic failed)
    USAGE = 2            # bad flags, values or config (click also uses 2)
    ENVIRONMENT = 3      # the machine lacks something: not root, no BPF, no headers, no bcc
    NOT_FOUND = 4        # no such lab / node / gateway / pinned datapath
    INTERRUPTED = 130    # Ctrl-C (128 + SIGINT, as shells report it)
