"""`python -m swarmrl.rollout ...` = `swarmrl worker ...`."""

import sys

from swarmrl.cli import main

# Guarded: engines that spawn processes (vLLM) re-import this module in each child.
if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
