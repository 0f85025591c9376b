"""An SMTP listener (``aiosmtpd``) for a deployment that routes a (sub)domain
to the bot: the bot is the final destination of its own addresses, never a
relay.

An accepted mail is never lost: ``handle_DATA`` awaits the ``accept``
callback, which writes the mail to SQLite (``inbound.Inbox.accept``), and
only then answers ``250``.  If that fails the answer is ``451`` and the
sender's server keeps the mail and retries.

Refused before the data is taken:
- a recipient that is not one of the bot's addresses (``bot@example.org`` or a
  ``bot+token@`` form of it): ``550``, so the bot relays nothing;
- more than ``max_recipients`` recipients: ``452``;
- a sender over its rate (``rate`` mails per ``window`` seconds per envelope
  sender): ``450`` at ``MAIL FROM``, a temporary refusal a real server retries;
- a ``MAIL FROM ... SIZE=`` above ``max_size``: ``552``.
A message larger than ``max_size`` gets ``552``: aiosmtpd counts the bytes
while it reads ``DATA`` and stops keeping them past the limit, so an
over-size message never sits in memory whole.

In listener mode no host in front has checked DKIM or DMARC unless the
deployment puts an MTA there: a mail is then a user's only through a reply
address.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope as SmtpEnvelope, Session

from bot.logsafety import sanitise
from bot.pacing import TokenBucket
from bot.transports.email.parse import MAX_BYTES, is_own_address

log = logging.getLogger(__name__)

MAX_SENDERS = 4096          # rate buckets kept; the least recently used go first


@dataclass(frozen=True)
class ListenerSettings:
    addresses: tuple[str, ...]          # the bot's own addresses; bot+token@ forms are accepted too
    host: str = "127.0.0.1"
    port: int = 2525                    # 0: any free port (``MailListener.port`` says which)
    max_size: int = MAX_BYTES
    rate: int = 30                      # mails per sender ...
    window: float = 60.0                # ... per this many seconds
    max_recipients: int = 20
    hostname: str = "localhost"         # the name in the greeting and EHLO answer
    timeout: float = 60.0               # an idle connection is closed after this long


@dataclass(frozen=True)
class Received:
    """One mail as the listener took it."""

    mail_from: str                      # the envelope sender ("" for a bounce's <>)
    rcpt_tos: tuple[str, ...]
    raw: bytes                          # the message as received (CRLF line ends)
    peer: str


Accept = Callable[[Received], Awaitable[None]]


class MailListener:
    """The listener (module docstring); ``accept`` must make the mail durable
    before it returns, and raise if it could not."""

    def __init__(self, settings: ListenerSettings, accept: Accept,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.addresses:
            raise ValueError("mail listener: no own addresses configured; it would accept nothing")
        self.settings = settings
        self._accept = accept
        self._clock = clock
        self._own = {a.lower() for a in settings.addresses}
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._server: asyncio.Server | None = None
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted sockets
            sock.bind((s.host, s.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname=s.hostname, data_size_limit=s.max_size, timeout=s.timeout,
                         ident="releasebot", loop=loop), sock=sock)
        log.info("mail listener on %s:%d for %s", s.host, self.port, ", ".join(sorted(self._own)))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # -- aiosmtpd hooks ----------------------------------------------------------

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          mail_options: list[str]) -> str:
        sender = "" if address == "<>" else address.lower()
        bucket = self._bucket(sender)
        if bucket.delay() > 0:
            log.info("mail listener: %s over its rate (%d per %gs): 450", sanitise(sender or "<>", 100),
                     self.settings.rate, self.settings.window)
            return "450 4.7.1 Too many messages from this sender, try again later"
        bucket.take()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not is_own_address(address, self._own):
            log.info("mail listener: recipient %s is not the bot's: 550", sanitise(address, 100))
            return "550 5.7.1 Relaying denied: not a local address"
        if len(envelope.rcpt_tos) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw = envelope.original_content or b""
        peer = session.peer
        sender = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        received = Received(sender, tuple(envelope.rcpt_tos), bytes(raw),
                            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer))
        try:
            await self._accept(received)
        except Exception as exc:
            log.error("mail listener: could not store a mail from %s (%d bytes): %s: 451",
                      sanitise(received.mail_from or "<>", 100), len(raw), sanitise(str(exc), 200))
            return "451 4.3.0 Could not store the message, try again later"
        self.accepted += 1
        return "250 2.0.0 Message accepted"

    async def handle_exception(self, error: Exception) -> str:
        log.error("mail listener: %s: %s", type(error).__name__, sanitise(str(error), 200))
        return "421 4.3.0 Internal error, closing connection"

    def _bucket(self, sender: str) -> TokenBucket:
        bucket = self._buckets.get(sender)
        if bucket is None:
            s = self.settings
            bucket = self._buckets[sender] = TokenBucket(s.rate / s.window, s.rate, self._clock)
            while len(self._buckets) > MAX_SENDERS:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(sender)
        return bucket

    def __repr__(self) -> str:
        return f"MailListener({self.settings.host}:{self.settings.port})"
