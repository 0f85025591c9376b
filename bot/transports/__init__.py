"""The front-ends, one package per protocol, found through one table.

Each module named here offers ``parse_config(section) -> Config | None``
(its ``networks:`` entry in bot.yaml, checked with ``engine.configkit``) and
``Transport``, the adapter class constructed with that config.  Config
parsing (``bot.config``) and app assembly (``bot.app``) both look protocols
up here, so adding a protocol is one line.  The modules are imported only
when a configuration names their protocol.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FRONT_ENDS: dict[str, str] = {
    "irc": "bot.transports.irc",
    "xmpp": "bot.transports.xmpp",
    "email": "bot.transports.email",
}


def front_end(protocol: str) -> ModuleType:
    """The adapter module for ``protocol`` (KeyError if there is none; ImportError
    if its library is missing)."""
    return importlib.import_module(FRONT_ENDS[protocol])
