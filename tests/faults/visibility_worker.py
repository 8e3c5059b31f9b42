"""``compactor worker`` with a short Redis visibility timeout (a test launcher, not a product entry point).

    FAULTS_VISIBILITY_TIMEOUT=2 python -m tests.faults.visibility_worker worker --name w1@%h

The product sets the visibility timeout above the hard time limit (hours), so a job never
outlives it in a test's time. This launcher shortens it, and makes kombu sweep for expired
unacknowledged messages every second instead of every ~100 s, so that Redis really hands a
running job's message to another worker — which must then find the job leased and do nothing.
Everything else is the real worker.
"""

from __future__ import annotations

import os
import sys

VISIBILITY_TIMEOUT_ENV = "FAULTS_VISIBILITY_TIMEOUT"


def main(argv: list[str]) -> int:
    from worker.celery_app import app

    options = dict(app.conf.broker_transport_options or {})
    options.update(
        visibility_timeout=float(os.environ[VISIBILITY_TIMEOUT_ENV]),
        # kombu ≥ 5.6: the sweep runs every interval × throttle seconds (default 10 × 10).
        unacked_restore_interval=1,
        unacked_restore_throttle=1,
    )
    app.conf.broker_transport_options = options

    from launcher.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
