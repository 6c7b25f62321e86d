"""`python -m hyperplane.lab serve ...`: the lab's own servers, run inside its namespaces;
`python -m hyperplane.lab controller ...`: the multi-node lab's controller (lab up spawns
it, hyperplane/lab/controller.py)."""
import sys

if sys.argv[1:2] == ["controller"]:
    from hyperplane.lab.controller import main
    sys.exit(main(sys.argv[2:]))

from hyperplane.lab.servers import _main  # noqa: E402

sys.exit(_main(sys.argv[1:]))
