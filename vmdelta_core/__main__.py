"""``python -m vmdelta_core`` runs the command line."""

import sys

from vmdelta_core.cli import main

sys.exit(main())
