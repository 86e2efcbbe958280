"""`python -m swarmrl.trainer ...` = `swarmrl train ...`."""

import sys

from swarmrl.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
