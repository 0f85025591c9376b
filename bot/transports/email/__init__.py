"""The email front-end: mail out through an SMTP submission server.

One file per job:

* ``config``: ``EmailConfig`` and ``parse_config`` (a ``networks:`` entry);
* ``message``: one mail built with the standard ``email`` package (headers
  for threading, deduplication and loop safety; no header injection);
* ``sender``: the SMTP client: one connection reused for a batch, each
  server answer turned into a settled receipt;
* ``transport``: the ``Transport`` contract (``bot.chat``) on top.

aiosmtplib is imported only inside this package; its exceptions become
``NotDelivered`` or ``Undeliverable``.
"""
from __future__ import annotations

from bot.transports.email.config import EmailConfig, parse_config
from bot.transports.email.transport import EmailTransport

Transport = EmailTransport

__all__ = ["EmailConfig", "EmailTransport", "Transport", "parse_config"]
