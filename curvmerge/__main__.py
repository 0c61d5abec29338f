"""``python -m curvmerge``: the ``curvmerge`` command (see :mod:`curvmerge.cli`)."""

import sys

from curvmerge.cli import main

if __name__ == "__main__":
    sys.exit(main())
