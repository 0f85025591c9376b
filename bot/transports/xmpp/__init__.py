"""The XMPP front-end: direct messages and XEP-0045 multi-user chat rooms.

``config`` holds ``XmppConfig`` and ``parse_config`` (a ``networks:`` entry),
``transport`` the adapter.  slixmpp is imported only inside this package.
"""
from __future__ import annotations

from bot.transports.xmpp.config import XmppConfig, parse_config
from bot.transports.xmpp.transport import XmppTransport, split_text

Transport = XmppTransport

__all__ = ["Transport", "XmppConfig", "XmppTransport", "parse_config", "split_text"]
