#!/usr/bin/env python
"""Refine a folder of SE outputs with Diffiner(+); see Arguments.md or --help."""

import sys

from diffiner.commands.refine import main

if __name__ == "__main__":
    sys.exit(main())
