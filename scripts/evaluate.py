#!/usr/bin/env python
"""Score enhanced speech folders (PESQ, ESTOI, SI-SDR, DNSMOS, NISQA); see Arguments.md or --help."""

import sys

from diffiner.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
