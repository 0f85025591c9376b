"""A fake Bugzilla 5 REST server on 127.0.0.1, for the ``bugzilla``
participant's tests and ``bench/bugzilla.py``.

It implements exactly the endpoints python-bugzilla calls for what the bot
does (version, login/logout, bug get and search with ``include_fields``,
bug update, comments read and added) and answers them the way a stock
Bugzilla 5.0.6 / 5.2 does: the same JSON, HTTP status codes, error codes and
messages, the default workflow, the resolution rules, atomic updates, private
bugs and private comments hidden, and the API key taken only as a query
parameter.  Where the fake differed from the real server, the bot could pass
its tests and fail in production, so ``tests/test_fakebugzilla.py`` pins the
behaviour.  No pytest here: the bench uses it too.
"""
from tests.fakebugzilla.server import Account, Bug, Comment, FakeBugzilla

__all__ = ["Account", "Bug", "Comment", "FakeBugzilla"]
