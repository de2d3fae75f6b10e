"""``python -m lightly_msn`` runs the command line."""

import sys

from lightly_msn.cli import main

sys.exit(main())
