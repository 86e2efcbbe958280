"""`python -m swarmrl.trainer ...` = `swarmrl train ...`."""

import sys

from swarmrl.cli import main

# Guarded: engines that spawn processes (vLLM) re-import this module in each child.
if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
