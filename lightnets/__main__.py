"""`python -m lightnets` runs the command line (also what torchrun -m lightnets uses)."""

import sys

from lightnets.cli import main

sys.exit(main())
