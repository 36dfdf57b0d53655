"""python -m freezeflow.core.train [-S file.key=value ...] [--resume]: training on a bare GPU box (core only)."""

import sys

from freezeflow.core.train.run import main

sys.exit(main())
