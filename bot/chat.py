"""The protocol-neutral chat vocabulary shared by every front-end.

Adapters in ``bot/transports/`` translate protocol objects to and from these
types; nothing outside an adapter sees an ``irc`` or ``slixmpp`` object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from engine.errors import ReleasebotError


class TransportError(ReleasebotError):
    """A front-end failed (connection lost, auth refused, ...); the protocol
    library's own exception is chained as ``__cause__``."""


# How an identity was established, strongest first.  ``whoami`` shows these.
VERIFIED_SERVICES = "services account"        # IRC: account-tag / account-notify / extended-join / WHOX
VERIFIED_HOSTMASK = "hostmask (weaker)"      # IRC: nick!user@host pattern explicitly allowed in users.yaml
VERIFIED_JID = "server-verified JID"          # XMPP direct message or MUC exposing real JIDs
VERIFIED_CONSOLE = "local console"            # whoever runs the console is the configured user
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


Target = Room | Identity
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

    async def send(self, target: Target, text: str) -> None:
        """Queue one line for delivery; paced, delivered once, survives reconnects."""

    async def close(self) -> None:
        """Flush what can be flushed and disconnect."""
