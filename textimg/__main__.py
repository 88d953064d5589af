"""``python -m textimg``: the same as the ``textimg`` command (see :mod:`textimg.cli`)."""

import sys

from textimg.cli import main

sys.exit(main())
