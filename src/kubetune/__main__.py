"""`python -m kubetune` runs the command line."""

import sys

from kubetune.cli import main

sys.exit(main())
