#!/usr/bin/env python
"""Train a Diffiner model on clean speech; see docs/training.md or --help."""

import sys

from diffiner.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
