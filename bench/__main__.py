"""python -m bench SUITE ... : the benchmarks side by side (see bench/README.md)."""

import sys

from bench.harness import main

sys.exit(main())
