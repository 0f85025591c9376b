"""The IRC front-end: one server connection per configured network.

Built on ``irc.client_aio`` for the socket and line parsing; everything the
bot depends on is done here by hand, one job per module:

* ``config``: the network's entry in bot.yaml (``IrcConfig``, ``parse_config``);
* ``text``: casefolding per the server's CASEMAPPING, UTF-8 line splitting;
* ``caps``: CAP LS 302 / REQ and SASL PLAIN, also late (services down at connect);
* ``roster``: who shares a channel with the bot, from where, logged in as what
  (IRCv3 account-tag, extended-join, account-notify, WHOX); a nick alone never counts,
  for a command's sender or for a ``bot.chat.Person`` the bot writes to;
* ``delivery``: per-target fair queues, pacing, confirmation (echo-message or
  marker PINGs), resending after a reconnect, private lines only to who asked,
  refusals counted against the lines they refuse;
* ``receipts``: the future ``send`` returns, settled by the server's confirmation;
* ``session``: one connection, the library adapted and its events dispatched;
* ``transport``: supervision (connect, reconnect with backoff, keepalive, the
  configured nick regained) and incoming lines turned into ``bot.chat.Message``.

Nothing from the ``irc`` library leaves this package.
"""
from __future__ import annotations

from bot.transports.irc.config import (DEFAULT_BURST, DEFAULT_CAPS, DEFAULT_MAX_QUEUED, DEFAULT_RATE, IrcConfig,
                                       parse_config)
from bot.transports.irc.transport import IrcTransport

Transport = IrcTransport

__all__ = ["DEFAULT_BURST", "DEFAULT_CAPS", "DEFAULT_MAX_QUEUED", "DEFAULT_RATE", "IrcConfig", "IrcTransport",
           "Transport", "parse_config"]
