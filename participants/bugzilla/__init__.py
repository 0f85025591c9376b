"""The ``bugzilla`` participant (``participant.py``): Bugzilla updates from
package changelogs, fixed vs mentioned (``changelog.py``), one update per
bug, exactly once, with a dry run.  Trackers are configured in bot.yaml
(``config.py``); python-bugzilla runs in a worker thread per tracker and the
API key never reaches a log or a message (``client.py``)."""
from participants.bugzilla.participant import Bugzilla

__all__ = ["Bugzilla"]
