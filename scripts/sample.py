#!/usr/bin/env python
"""Draw unconditional speech samples from a trained Diffiner model; see docs/training.md or --help."""

import sys

from diffiner.sample import main

if __name__ == "__main__":
    sys.exit(main())
