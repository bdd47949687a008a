"""``python -m funcbo``: the funcbo command."""

import sys

from funcbo.cli import main

sys.exit(main())
