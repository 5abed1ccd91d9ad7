"""`python -m sentinelctl`: the same command line as the `sentinelctl` script."""

import sys

from sentinelctl.cli import main

sys.exit(main())
