"""`python -m distbp ...` is the `distbp` command (distbp.entry: stop signals caught first)."""

import sys

from distbp.entry import main

sys.exit(main())
