"""The protocol-neutral chat vocabulary shared by every front-end.

Adapters in ``bot/transports/`` translate protocol objects to and from these
types; nothing outside an adapter sees an ``irc`` or ``slixmpp`` object.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from engine.errors import ReleasebotError


class TransportError(ReleasebotError):
    """A front-end failed (connection lost, auth refused, ...); the protocol
    library's own exception is chained as ``__cause__``."""


class NotDelivered(TransportError):
    """A message was not delivered this time, and may be later: the network is
    down, the person is not online (no handle verified as theirs right now), the
    server answered "try later" (SMTP 4xx).  The outbox tries again."""


class Offline(NotDelivered):
    """The person has no handle the server vouches for as theirs on this
    network right now (no nick logged into their account): the message waits,
    or goes by their fallback (``fallback email on``)."""


class Undeliverable(TransportError):
    """A message can never reach its target as addressed: an unknown channel, a
    refused address (SMTP 5xx, with the server's text), a person with no
    identity on that network.  The outbox marks it failed with this reason."""


# How an identity was established, strongest first.  ``whoami`` shows these.
VERIFIED_SERVICES = "services account"        # IRC: account-tag / account-notify / extended-join / WHOX
VERIFIED_HOSTMASK = "hostmask (weaker)"      # IRC: nick!user@host pattern explicitly allowed in users.yaml
VERIFIED_JID = "server-verified JID"          # XMPP direct message or MUC exposing real JIDs
VERIFIED_CONSOLE = "local console"            # whoever runs the console is the configured user
VERIFIED_MAIL_TOKEN = "single-use reply address"   # mail: a reply to an address only that user was sent
VERIFIED_MAIL_DOMAIN = "sender's domain (Authentication-Results; weaker)"   # mail: the domain, not the mailbox
UNVERIFIED = "not verified"


@dataclass(frozen=True)
class Identity:
    """Who sent a message.

    ``handle`` is what the network shows (an IRC nick, an XMPP full JID or MUC
    occupant nick); it is never trusted on its own.  ``account`` is the
    identifier the server vouches for (IRC services account, XMPP bare JID),
    or None; ``verified_by`` says how it was established.
    """

    protocol: str                 # "irc" | "xmpp" | "console" | "email"
    network: str                  # the configured network name, e.g. "libera"
    handle: str
    account: str | None = None
    verified_by: str = UNVERIFIED
    hostmask: str | None = None   # IRC nick!user@host, for the explicit hostmask fallback
    origin: str | None = None     # where they connect from (IRC: the host), for rate limits only

    def __str__(self) -> str:
        return f"{self.protocol}:{self.network}:{self.handle}"

    @property
    def nick(self) -> str:
        """How to address them in a room: the IRC nick, the MUC occupant nick."""
        return self.handle.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Room:
    """A channel (IRC) or multi-user chat room (XMPP)."""

    protocol: str
    network: str
    name: str                     # "#ops", "ops@conference.example.org"
    exposes_identities: bool = True   # False: an XMPP MUC hiding real JIDs

    def __str__(self) -> str:
        return f"{self.name}@{self.network}"


@dataclass(frozen=True)
class Message:
    """An incoming command, already stripped of its prefix or addressing."""

    sender: Identity
    text: str
    room: Room | None = None      # None: a private/direct message
    # Mail only (the email front-end's inbox, see bot.transports.email.receiver):
    commit_with: tuple[Any, ...] = ()   # store ops written with the command's effect, or with its reply:
                                        # the mail's "handled" mark, so its effect happens once
    spend: tuple[Any, ...] = ()         # written only with an effect: the reply address used up
    thread: str = ""                    # the mail's Message-ID: the reply goes in its thread
    refusal: str = ""                   # not a command: why the mail was refused (the claimed
                                        # user, ``sender.account``, if any, is told once)


@dataclass(frozen=True)
class Person:
    """A configured user (or, for mail, a plain address) as the target of a
    message the bot starts itself (the outbox), on one network.

    The adapter delivers only to a handle the server vouches for *now*: on
    IRC a nick logged into one of ``accounts`` (or matching one of
    ``hostmasks``, where users.yaml allows it); on XMPP one of the bare JIDs
    in ``accounts``; by mail the addresses in ``accounts``.  When no handle
    is verified as theirs, ``send`` fails with NotDelivered (offline): an
    impostor holding the nick never receives it."""

    protocol: str
    network: str
    user: str                          # the users.yaml name ("" for a plain mail address)
    accounts: tuple[str, ...] = ()     # IRC services accounts / XMPP bare JIDs / mail addresses
    hostmasks: tuple[str, ...] = ()    # IRC nick!user@host patterns, where explicitly allowed
    handle: str = ""                   # where they were last seen (the nick that sent a command): a hint
                                       # to look first, verified like any other before anything is sent

    def __str__(self) -> str:
        return f"{self.user or ','.join(self.accounts)}@{self.network}"


@dataclass(frozen=True)
class Outgoing:
    """A message with more than text: what mail needs (chat adapters use ``text``)."""

    text: str                          # the chat line(s); the mail body
    subject: str = ""
    message_id: str = ""               # stable across retries: receivers drop repeats by it
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    reply_to: str = ""                 # a single-use reply address (email front-end)


Target = Room | Identity | Person
MessageHandler = Callable[[Message], Awaitable[None]]


class Transport(Protocol):
    """What every front-end adapter offers.  Adapters are constructed with
    their config and injected into the router; they call ``on_message`` for
    every message addressed to the bot (prefix, nick or private) with the
    addressing stripped, and never for the bot's own messages."""

    protocol: str
    network: str

    async def start(self, on_message: MessageHandler) -> None:
        """Connect (and keep reconnecting) in the background; returns once started."""

    @property
    def ready(self) -> bool:
        """Connected and able to send now (the outbox waits while this is False)."""

    async def send(self, target: Target, text: str | Outgoing) -> asyncio.Future[None]:
        """Queue a message for delivery (paced; lines unconfirmed when a connection
        dies are sent again after reconnecting) and return its receipt: a future
        that resolves once the server confirmed the whole message (IRC: its echo,
        or the answer to a PING written after it; XMPP: the XEP-0198 ack, or on a
        server without it the answer to a ping written after the message; mail:
        the 250 after DATA), or fails with NotDelivered (try again later) or
        Undeliverable (never).  Callers that do not care need not await it; an
        adapter must not log a failed receipt nobody awaited as an error.
        ``close`` fails the receipts still open with NotDelivered."""

    async def close(self) -> None:
        """Flush what can be flushed and disconnect."""
