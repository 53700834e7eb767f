"""``python -m maitred_tx.queue``: the queue tools (maitred_tx.queue.cli)."""

import sys

from maitred_tx.queue.cli import main

sys.exit(main())
