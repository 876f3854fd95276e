"""`python -m fedtune`: the same command line as the `fedtune` script."""

import sys

from .cli import main

sys.exit(main())
