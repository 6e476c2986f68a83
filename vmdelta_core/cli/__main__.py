import sys

from vmdelta_core.cli import main

sys.exit(main())
