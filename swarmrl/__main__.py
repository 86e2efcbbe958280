"""`python -m swarmrl ...` = `swarmrl ...`."""

import sys

from swarmrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
