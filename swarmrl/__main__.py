"""`python -m swarmrl ...` = `swarmrl ...`."""

import sys

from swarmrl.cli import main

sys.exit(main())
