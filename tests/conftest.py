from __future__ import annotations

import signal
import sys

# Server fixtures live in their own modules, one per protocol; engine fixtures in theirs.
pytest_plugins = ["tests.servers.tls", "tests.servers.irc", "tests.servers.xmpp", "tests.servers.smtp",
                  "tests.servers.mailin", "tests.servers.publish", "tests.engine_fixtures"]


def _exit_on_term(signum, frame):  # killed by a timeout: let fixtures stop their servers
    sys.exit(1)


signal.signal(signal.SIGTERM, _exit_on_term)
