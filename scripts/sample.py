#!/usr/bin/env python
"""Draw unconditional speech samples from a trained Diffiner model; see docs/training.md or --help."""

import sys

from diffiner.commands.sample_prior import main

if __name__ == "__main__":
    sys.exit(main())
