"""Where a message may go, written as text in definitions and config, and
checked before anything is sent: a bad destination is refused by ``check``
(with file:line) or when the step runs, never discovered at delivery.

The forms:

* ``irc:<network>:#channel``      a channel on an IRC network
* ``xmpp:<network>:room@service``  a room the bot joins on an XMPP network
* ``email:<address>``             a mail address (when one email network is configured)
* ``email:<network>:<address>``   a mail address, sent through that email network
* ``user:<name>``                 a user from users.yaml, on every network where they have an identity
* ``user:<name>@<network>``       that user on one network

A user is reached only at an identity the server vouches for right now (see
``bot.chat.Person``); a channel, room or address as written.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Mapping

from engine.errors import ReleasebotError

CHAT = ("irc", "xmpp")
_IRC_CHANNEL = re.compile(r"[#&+!][^\s,\x00-\x1f\x7f]{1,199}")
_ROOM_JID = re.compile(r"[^@/\s\x00-\x1f\x7f\"&'<>:]{1,1023}@[A-Za-z0-9.-]{1,255}")
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*")
_USER = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class BadDestination(ReleasebotError):
    """A destination that cannot work as written (one line, naming it)."""


def is_address(text: str) -> bool:
    """A plain addr-spec (``local@domain``), nothing around it."""
    return len(text) <= 254 and _ADDRESS.fullmatch(text) is not None


@dataclass(frozen=True)
class Address:
    """One resolved destination: a room or mail address on a network, or a
    user on a network.  ``key`` identifies it for ordering (messages to one
    destination are delivered in the order they were written)."""

    kind: str          # "room" | "mail" | "user"
    network: str
    target: str        # the channel or room, the mail address, the user's name
    key: str = field(init=False, repr=False, compare=False)
    lane: int = field(init=False, repr=False, compare=False)     # crc32 of the key (the outbox's index)

    def __post_init__(self) -> None:
        key = (f"user:{self.target}@{self.network}" if self.kind == "user"
               else f"{self.kind}:{self.network}:{self.target}")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "lane", zlib.crc32(key.encode("utf-8")))

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class Book:
    """What destinations are checked against: the configured networks and
    where each user has an identity."""

    networks: Mapping[str, str] = field(default_factory=dict)          # name -> protocol
    rooms: Mapping[str, frozenset[str]] = field(default_factory=dict)   # xmpp network -> rooms the bot joins
    users: Mapping[str, frozenset[str]] = field(default_factory=dict)   # user -> networks they are on

    def email_networks(self) -> list[str]:
        return sorted(n for n, p in self.networks.items() if p == "email")

    def resolve(self, text: object) -> list[Address]:
        """The addresses ``text`` stands for; BadDestination says why not."""
        if not isinstance(text, str) or not text.strip():
            raise BadDestination(f"destination {text!r}: expected text like irc:<network>:#channel, "
                                 "email:<address> or user:<name>")
        kind, _, rest = text.strip().partition(":")
        if kind == "user":
            return self._user(text, rest)
        if kind == "email":
            return [self._mail(text, rest)]
        if kind in CHAT:
            network, sep, room = rest.partition(":")
            self._network(text, network, kind)
            if not sep or not room:
                raise BadDestination(f"destination {text!r}: expected {kind}:<network>:<room>")
            if kind == "irc" and not _IRC_CHANNEL.fullmatch(room):
                raise BadDestination(f"destination {text!r}: {room!r} is not an IRC channel (#name, no spaces "
                                     "or commas); people are written user:<name>")
            if kind == "xmpp":
                if not _ROOM_JID.fullmatch(room):
                    raise BadDestination(f"destination {text!r}: {room!r} is not a room address (room@service)")
                joined = self.rooms.get(network, frozenset())
                if room.lower() not in {r.lower() for r in joined}:
                    raise BadDestination(f"destination {text!r}: the bot does not join {room} on {network} "
                                         f"(its rooms: {', '.join(sorted(joined)) or 'none'}); people are "
                                         "written user:<name>")
            return [Address("room", network, room)]
        raise BadDestination(f"destination {text!r}: unknown kind {kind!r} (expected irc:, xmpp:, email: or user:)")

    def _network(self, text: str, network: str, protocol: str) -> None:
        if self.networks.get(network) != protocol:
            known = ", ".join(sorted(n for n, p in self.networks.items() if p == protocol)) or "none configured"
            raise BadDestination(f"destination {text!r}: no {protocol} network {network!r} in bot.yaml "
                                 f"(its {protocol} networks: {known})")

    def _mail(self, text: str, rest: str) -> Address:
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in rest):
            raise BadDestination(f"destination {text!r}: {rest!r} is not a mail address (local@domain)")
        network, sep, address = rest.rpartition(":")
        if not sep:
            mail = self.email_networks()
            if len(mail) != 1:
                raise BadDestination(f"destination {text!r}: " + (
                    "no email network in bot.yaml" if not mail else
                    f"several email networks ({', '.join(mail)}): write email:<network>:<address>"))
            network = mail[0]
        else:
            self._network(text, network, "email")
        if not is_address(address):
            raise BadDestination(f"destination {text!r}: {address!r} is not a mail address (local@domain)")
        return Address("mail", network, address)

    def _user(self, text: str, rest: str) -> list[Address]:
        name, sep, network = rest.partition("@")
        if not _USER.fullmatch(name) or name not in self.users:
            raise BadDestination(f"destination {text!r}: no user {name!r} in users.yaml")
        on = self.users[name]
        if sep:
            if network not in self.networks:
                raise BadDestination(f"destination {text!r}: no network {network!r} in bot.yaml")
            if network not in on:
                raise BadDestination(f"destination {text!r}: {name} has no identity on {network} in users.yaml")
            return [Address("user", network, name)]
        if not on:
            raise BadDestination(f"destination {text!r}: {name} has no identity on any configured network")
        return [Address("user", n, name) for n in sorted(on)]
