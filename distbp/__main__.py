"""`python -m distbp ...` is the `distbp` command."""

import sys

from distbp.cli import main

sys.exit(main())
