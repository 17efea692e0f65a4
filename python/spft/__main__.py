"""`python -m spft` = the `spft` command."""

import sys

from spft.cli import main

sys.exit(main())
