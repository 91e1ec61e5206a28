"""``python -m masasurgery``: the command line (see :mod:`masasurgery.cli`)."""

import sys

from masasurgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
