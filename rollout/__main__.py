"""`python -m swarmrl.rollout ...` = `swarmrl worker ...`."""

import sys

from swarmrl.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
