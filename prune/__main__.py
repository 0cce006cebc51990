"""``python -m prune ...``: the console script, also under ``torchrun`` / ``accelerate launch``."""

import sys

from prune.cli import main

sys.exit(main())
