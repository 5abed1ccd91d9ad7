"""`python -m sentinelctl`."""

import sys

from sentinelctl.cli import main

sys.exit(main())
