"""The XMPP front-end: direct messages and XEP-0045 multi-user chat rooms.

One file per job:

* ``config``: ``XmppConfig`` and ``parse_config`` (a ``networks:`` entry);
* ``text``: chat text into message bodies (split, packed);
* ``roomtrust``: who a room shows the bot with which real JID; the rules
  every room command is judged by, in plain Python;
* ``rooms``: joining rooms and feeding ``roomtrust`` from their stanzas;
* ``inbound``: which messages are commands, and from whom;
* ``delivery``: the fair, capped outbound queue, confirmation by the server
  (XEP-0198 acks, else a ping), bounces, requeueing;
* ``receipts``: the future ``send`` returns, and how it settles;
* ``transport``: the connection, kept up: connect, keepalive, reconnect.

slixmpp is imported only inside this package; its exceptions become
``TransportError``.
"""
from __future__ import annotations

from bot.transports.xmpp.config import XmppConfig, parse_config
from bot.transports.xmpp.text import split_text
from bot.transports.xmpp.transport import XmppTransport

Transport = XmppTransport

__all__ = ["Transport", "XmppConfig", "XmppTransport", "parse_config", "split_text"]
