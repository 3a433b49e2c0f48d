"""``python -m refinedet ...``: the same as the ``refinedet`` console script."""

import sys

from refinedet.cli import main

sys.exit(main())
