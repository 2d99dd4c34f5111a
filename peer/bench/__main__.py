"""``python -m peer.bench <name> …``: see peer/bench/runner.py."""

import sys

from peer.bench.runner import main

sys.exit(main())
