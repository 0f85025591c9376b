"""Which incoming messages are commands, and who sent them.

In a direct message the sender is the bare JID the server stamps on it
(``VERIFIED_JID``).  In a room, or privately through one, only what the room
shows counts (``RoomTrust``): a bare nickname is not a person.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from bot.addressing import command_text
from bot.chat import VERIFIED_JID, Identity, Message, Room
from bot.logsafety import sanitise
from bot.transports.xmpp.delivery import Delivery
from bot.transports.xmpp.roomtrust import PROTOCOL, RoomTrust, Spawn

log = logging.getLogger(__name__)

Handler = Callable[[Any, str], None]


class Inbound:
    """slixmpp's ``message`` event in, ``dispatch(Message)`` out."""

    def __init__(self, network: str, own_jid: str, prefix: str, trust: RoomTrust, delivery: Delivery,
                 dispatch: Callable[[Message], None], reply: Callable[[Identity, str], None],
                 spawn: Spawn) -> None:
        self.network = network
        self.own_jid = own_jid            # the bot's bare JID: other sessions of it are not users
        self.prefix = prefix
        self.trust = trust
        self.delivery = delivery
        self._dispatch = dispatch
        self._reply = reply
        self._spawn = spawn

    def message(self, msg: Any) -> None:
        body = msg["body"]
        if not body or not body.strip():
            return                      # chat states, receipts, subjects
        mtype = msg["type"]
        if mtype == "groupchat":
            self.room_message(msg, body)
        elif mtype in ("chat", "normal"):
            self.direct_message(msg, body)

    def direct_message(self, msg: Any, body: str) -> None:
        sender = msg["from"]
        bare = sender.bare
        if not sender.user or not sender.resource or bare == self.own_jid:
            return                      # a service or room (invites), or another session of ours
        if self.trust.is_room(bare):
            # A private message through a room: only the room's view of the sender counts.
            nick = sender.resource
            if nick == self.trust.our_nick(bare) or self._held(bare, nick, self.direct_message, msg, body):
                return
            ident = self.trust.occupant(bare, nick)
        else:
            ident = Identity(PROTOCOL, self.network, str(sender), account=bare, verified_by=VERIFIED_JID)
        text = command_text(body, self.prefix, in_room=False, is_own_nick=lambda _: False)
        if text is None:
            return
        if msg.get_plugin("delay", check=True) is not None:
            # Stored while we were offline: running it late could surprise its sender.
            if text:
                log.info("xmpp %s: not running %r from %s, sent while I was offline", self.network,
                         sanitise(text), ident)
                self._reply(ident, f"I was offline when you sent {sanitise(text, 60)!r}; "
                                   "not run: send it again if you still want it")
            return
        self._dispatch(Message(ident, text))

    def room_message(self, msg: Any, body: str) -> None:
        sender = msg["from"]
        room, nick = sender.bare, sender.resource
        ours = self.trust.our_nick(room)
        if ours is None or not nick:
            return                      # not a room we are in, or the room itself speaking
        if nick == ours or self.delivery.is_own(msg["id"]):
            return                      # the room reflecting our own message: never answer it
        if msg.get_plugin("delay", check=True) is not None:
            return                      # history replayed on join
        text = command_text(body, self.prefix, in_room=True,
                            is_own_nick=lambda name: name.casefold() == ours.casefold())
        if text is None or self._held(room, nick, self.room_message, msg, body):
            return
        ident = self.trust.occupant(room, nick)
        where = Room(PROTOCOL, self.network, room, exposes_identities=ident.account is not None)
        self._dispatch(Message(ident, text, where))

    def _held(self, room: str, nick: str, handler: Handler, msg: Any, body: str) -> bool:
        """While a room is being re-read, hold its commands until we know what
        it shows us; then handle them again, unless their nick left meanwhile."""
        released = self.trust.hold(room, nick)
        if released is None:
            return False

        async def later() -> None:
            if await released:
                handler(msg, body)
        self._spawn(later(), "held command")
        return True
