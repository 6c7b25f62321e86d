"""hpctl: the command-line interface to hyperplane (installed from the cli/ folder)."""
