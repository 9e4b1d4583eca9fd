"""``python -m divebatch`` runs the ``divebatch`` command (see :mod:`divebatch.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
