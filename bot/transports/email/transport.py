"""The email transport: the ``Transport`` contract over SMTP (outgoing mail).

Mail goes to a ``Person`` (``protocol="email"``, this network, the addresses
in ``accounts``); rooms and chat identities have no mailbox here, and sending
to one is a ``TransportError``.  No connection is held open while there is
nothing to send: ``ready`` is True until ``close`` (or while a refused login
holds sending off, see ``sender``), and the first message opens one.
Incoming mail (``receiver``: IMAP and/or an SMTP listener, as configured)
needs the bot's database: the app calls ``use`` before ``start``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Collection, Mapping

from bot.chat import MessageHandler, NotDelivered, Outgoing, Person, Target, TransportError, Undeliverable
from bot.transports.email.config import EmailConfig
from bot.transports.email.message import BadMessage, build, envelope
from bot.transports.email.receiver import MailIn
from bot.transports.email.schema import Storage
from bot.transports.email.sender import Job, Sender

log = logging.getLogger(__name__)

PROTOCOL = "email"
#: A body longer than this is encoded in a thread: the stdlib's quoted-printable
#: takes ~0.08 s per MB here, which would stall every chat front-end on the loop.
BUILD_IN_THREAD = 100_000


class EmailTransport:
    """One email network: its SMTP submission server and the bot's address."""

    protocol = PROTOCOL

    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        self.network = config.name
        self.sender = Sender(config)
        self._on_message: MessageHandler | None = None
        self._closed = False
        self.mail_in: MailIn | None = None

    def use(self, storage: Storage, users: Mapping[str, Collection[str]], is_command: Callable[[str], bool],
            rate: tuple[int, float] = (5, 10.0)) -> None:
        """Give mail in what it needs: the bot's database (the ``email`` tables),
        each user's configured addresses, how to tell a command, and the
        per-sender pace (bot.yaml ``commands: rate_limit``)."""
        if self.config.receives:
            self.mail_in = MailIn(self.config, storage, users, is_command, rate=rate)

    def issue_token(self, user: str, purpose: str, ref: str, expires: float) -> tuple[str, list[Any]] | None:
        """A single-use reply address for a mail to ``user``, if mail comes in here."""
        return self.mail_in.issue_token(user, purpose, ref, expires) if self.mail_in is not None else None

    @property
    def ready(self) -> bool:
        """Able to send: not closed, and no refused login holding sending off."""
        return not self._closed and not self.sender.held

    @property
    def connections(self) -> int:
        """SMTP connections opened so far (one per batch of messages)."""
        return self.sender.connections

    async def start(self, on_message: MessageHandler) -> None:
        """Record the handler for incoming mail; connections are opened when a
        message is sent.  Refuses a login with no password (``check`` accepts one)."""
        if self.config.user is not None and self.config.password is None:
            raise TransportError(f"email {self.network}: no password (the variable password_env names is not set)")
        self._on_message = on_message
        log.info("email %s: sending through %s:%d (%s) as %s", self.network, self.config.smtp_host,
                 self.config.port, self.config.security, self.config.sender.addr_spec)
        if self.config.receives:
            if self.mail_in is None:
                raise TransportError(f"email {self.network}: mail in is configured but has no database (use())")
            try:
                await self.mail_in.start(on_message)
            except (OSError, ValueError) as exc:
                raise TransportError(f"email {self.network}: mail in cannot start: {exc}") from exc

    async def send(self, target: Target, text: str | Outgoing) -> asyncio.Future[None]:
        """Queue one mail to every address of ``target`` and return its receipt
        (resolved by the 250 after DATA).  A malformed address or id fails the
        receipt with ``Undeliverable``, without a connection."""
        if not isinstance(target, Person):
            raise TransportError(f"email {self.network}: cannot mail {target} (only a person has an address)")
        if target.protocol != PROTOCOL or target.network != self.network:
            raise TransportError(f"email {self.network}: {target} is not on this network")
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            return _failed(receipt, NotDelivered(f"email {self.network}: closed"))
        outgoing = text if isinstance(text, Outgoing) else Outgoing(text)
        try:
            if not target.accounts:
                raise BadMessage(f"{target} has no address")
            if len(outgoing.text) > BUILD_IN_THREAD:
                label, (mail_from, recipients, data) = await asyncio.to_thread(self._encode, target, outgoing)
            else:
                label, (mail_from, recipients, data) = self._encode(target, outgoing)
        except BadMessage as exc:
            return _failed(receipt, Undeliverable(f"email {self.network}: {exc}"))
        self.sender.submit(Job(mail_from, recipients, data, receipt, label=label))
        return receipt

    def _encode(self, target: Person, outgoing: Outgoing) -> tuple[str, tuple[str, tuple[str, ...], bytes]]:
        """The message's id and its envelope and bytes (``BadMessage`` if it cannot be built)."""
        mail = build(self.config.sender, target.accounts, outgoing)
        return str(mail["Message-ID"]), envelope(mail)

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Send what the server takes within ``flush_timeout``; the rest fails NotDelivered."""
        if self._closed:
            return
        self._closed = True
        if self.mail_in is not None:
            await self.mail_in.stop()
        await self.sender.close(flush_timeout)
        log.info("email %s: closed", self.network)


def _failed(receipt: asyncio.Future[None], failure: TransportError) -> asyncio.Future[None]:
    """``receipt`` failed with ``failure``, marked retrieved: one nobody awaits is not an error."""
    receipt.set_exception(failure)
    receipt.exception()
    return receipt
