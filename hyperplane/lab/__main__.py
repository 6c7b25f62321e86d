"""`python -m hyperplane.lab serve ...`: the lab's own servers, run inside its namespaces."""
import sys

from hyperplane.lab.servers import _main

sys.exit(_main(sys.argv[1:]))
