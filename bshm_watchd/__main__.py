"""``python -m bshm_watchd`` is ``bshm-watchd``."""

import sys

from bshm_watchd.cli import main

sys.exit(main())
