"""Who speaks in a room, and with which real JID: the trust behind every room command.

A room occupant is a nickname; only the room can say whose it is.  A
nickname counts as a person (their real bare JID, ``VERIFIED_JID``) only
while the room shows the bot that JID in the occupant's presence: in
non-anonymous rooms, and in rooms where the bot is a moderator (it created
them).  Everything here follows three rules:

* Every presence replaces what was known of its nick: the real JID it
  carries, or nothing.  A nick someone else takes never inherits a JID, and a
  nick that leaves is forgotten.
* When the room's owner changes who may see real JIDs (XEP-0045 status
  172/173/174 in a message or presence, or a bare 104 and a disco#info that
  says so or cannot say), JIDs learned before are forgotten, never carried
  over, and the room is re-read.  Commands arriving meanwhile are held,
  neither trusted on stale JIDs nor refused for a moment, and dropped if
  their nick left (or changed hands) before the room was re-read.
* Private output for an occupant identified by real JID goes to that JID,
  never to ``room/nick``, which someone else may hold by the time it is
  delivered.

This is plain Python: the transport turns stanzas into the calls below and
does the asking (``RoomReader``), so every rule is tested without a server.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Coroutine, Iterable, Protocol

from bot.chat import UNVERIFIED, VERIFIED_JID, Identity

log = logging.getLogger(__name__)

PROTOCOL = "xmpp"
# XEP-0045 status codes
NON_ANONYMOUS_ON_ENTRY = 100      # in the join's self-presence: any occupant may see your real JID
SELF = 110                        # this presence is about the bot itself
NICK_CHANGED = 303                # an unavailable presence that is a nick change, not a leave
SERVICE_SHUTDOWN = 332            # the room service is going down: the next session rejoins
ROOM_CREATED = 201
NOW_NON_ANONYMOUS, NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS, CONFIG_CHANGED = 172, 173, 174, 104
ROOM_CONFIG_CODES = frozenset({NOW_NON_ANONYMOUS, NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS, CONFIG_CHANGED})

Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class RoomReader(Protocol):
    """What room trust needs asked of the server (the transport does it)."""

    async def non_anonymous(self, room: str) -> bool | None:
        """disco#info: does ``room`` show real JIDs to every occupant now?  None: it could not say."""

    async def reread(self, room: str, nick: str) -> bool:
        """Have ``room`` send every occupant's presence again (each arrives as a
        ``presence`` call before this returns).  False if that failed."""


@dataclass
class Occupant:
    serial: int                    # new whenever the nick is taken anew: held commands compare it
    real_jid: str | None = None    # bare JID, only while the room shows it to the bot


@dataclass
class _Review:
    """A room whose configuration changed, being re-read; its commands wait for ``done``."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    disco: bool = False            # a 104: ask the room whether who sees real JIDs changed
    resync: bool = False           # re-read the occupant list


@dataclass
class _RoomState:
    tracking: bool = False         # joining or joined: its presences count
    nick: str | None = None        # the bot's nick in it, while joined
    non_anonymous: bool = False    # what the room last said about itself
    occupants: dict[str, Occupant] = field(default_factory=dict)
    review: _Review | None = None


@dataclass(frozen=True)
class Departure:
    """Someone is gone from a room: output queued for them there has no one to reach."""

    room: str
    nick: str | None               # None: the bot itself is out of the room (kicked, banned, destroyed)
    new_nick: str | None = None    # a nick change (303): the same occupant goes on under this nick


class RoomTrust:
    """What each configured room shows the bot, kept from its presences."""

    def __init__(self, network: str, rooms: Iterable[str], reader: RoomReader, spawn: Spawn) -> None:
        self.network = network
        self._reader = reader
        self._spawn = spawn
        self._rooms: dict[str, _RoomState] = {room: _RoomState() for room in rooms}
        self._serials = itertools.count(1)

    # --- membership -------------------------------------------------------------

    def is_room(self, jid: str) -> bool:
        """``jid`` is one of our rooms (joined or not): ``jid/nick`` is an occupant, never a person."""
        return jid in self._rooms

    def our_nick(self, room: str) -> str | None:
        """The bot's nick in ``room`` while it is joined, else None."""
        state = self._rooms.get(room)
        return state.nick if state is not None and state.tracking else None

    def joining(self, room: str) -> None:
        """A (re)join starts: the occupants are learned afresh from its presences."""
        state = self._rooms[room]
        state.tracking, state.nick, state.occupants = True, None, {}

    def joined(self, room: str, nick: str, codes: Collection[int]) -> None:
        state = self._rooms[room]
        state.tracking, state.nick = True, nick
        state.non_anonymous = NON_ANONYMOUS_ON_ENTRY in codes

    def join_failed(self, room: str) -> None:
        state = self._rooms[room]
        state.tracking, state.nick, state.occupants = False, None, {}

    def present(self, room: str) -> set[str]:
        """The occupants' nicks (not the bot's)."""
        state = self._rooms.get(room)
        return set(state.occupants) if state is not None and state.tracking else set()

    def reviewing(self, room: str) -> bool:
        state = self._rooms.get(room)
        return state is not None and state.review is not None

    # --- what the room says ---------------------------------------------------------

    def presence(self, room: str, nick: str, *, available: bool, real_jid: str | None = None,
                 codes: Collection[int] = (), new_nick: str | None = None) -> Departure | None:
        """An occupant presence (not an error): ``real_jid`` is the bare JID in
        it, if the room showed one.  Returns who left, if anyone did."""
        state = self._rooms.get(room)
        if state is None or not state.tracking or not nick:
            return None
        departure: Departure | None = None
        # Ours: once joined, only for our nick (nobody else's presence can make us leave or rename us).
        if SELF in codes and (state.nick is None or nick == state.nick):
            departure = self._own_presence(room, state, nick, available, codes, new_nick)
        elif not available:
            state.occupants.pop(nick, None)
            departure = Departure(room, nick, new_nick if NICK_CHANGED in codes and new_nick else None)
        else:
            known = state.occupants.get(nick)
            if known is None or (known.real_jid and real_jid and known.real_jid != real_jid):
                state.occupants[nick] = Occupant(next(self._serials), real_jid or None)
            else:
                known.real_jid = real_jid or None
        changed = set(codes) & ROOM_CONFIG_CODES
        if changed:
            self.config_changed(room, changed)
        return departure

    def _own_presence(self, room: str, state: _RoomState, nick: str, available: bool,
                      codes: Collection[int], new_nick: str | None) -> Departure | None:
        if available:
            state.nick = nick                     # the room may have changed it (status 210)
            return None
        if NICK_CHANGED in codes and new_nick:
            state.nick = new_nick
            return None
        state.tracking, state.nick, state.occupants = False, None, {}
        # A shutdown is no departure: what was queued for the room goes out after the rejoin.
        return None if SERVICE_SHUTDOWN in codes else Departure(room, None)

    def config_changed(self, room: str, codes: Collection[int]) -> None:
        """The owner changed the room's configuration (status codes from a room
        message or presence).  Runs as the stanza is handled, so a command right
        behind a 173 is already judged by it; commands arriving until the room
        is re-read are held (``hold``)."""
        state = self._rooms.get(room)
        if state is None or not state.tracking:
            return
        codes = set(codes)
        review = state.review
        new = review is None
        if review is None:
            review = state.review = _Review()
        if codes & {NOW_SEMI_ANONYMOUS, NOW_FULLY_ANONYMOUS}:
            code = NOW_FULLY_ANONYMOUS if NOW_FULLY_ANONYMOUS in codes else NOW_SEMI_ANONYMOUS
            state.non_anonymous = False
            self._stop_trusting(room, f"is now {'fully' if code == NOW_FULLY_ANONYMOUS else 'semi'}-anonymous "
                                      f"(status {code})")
            review.resync = True                  # as a moderator or owner we may still see real JIDs
        elif NOW_NON_ANONYMOUS in codes:
            state.non_anonymous = True
            log.info("xmpp %s: %s is now non-anonymous (status 172); re-reading its occupants",
                     self.network, room)
            review.resync = True
        elif codes & ROOM_CONFIG_CODES:           # 104: something changed, perhaps who sees real JIDs
            review.disco = True
        if new:
            self._spawn(self._review(room, state, review), "room review")

    # --- who is who ---------------------------------------------------------------

    def occupant(self, room: str, nick: str) -> Identity:
        """A room occupant: their real bare JID only if the room shows it to the bot now."""
        state = self._rooms.get(room)
        known = state.occupants.get(nick) if state is not None and state.tracking else None
        account = known.real_jid if known is not None else None
        return Identity(PROTOCOL, self.network, f"{room}/{nick}", account=account,
                        verified_by=VERIFIED_JID if account else UNVERIFIED)

    def private_address(self, ident: Identity) -> str:
        """Where private output for ``ident`` goes.  A room occupant whose real
        JID the room showed us gets a direct message to that JID: ``room/nick``
        is only a nickname, which someone else may hold by the time the line is
        delivered (queued across a reconnect, or after they left); private
        release output must reach the person who asked.  An occupant we could
        not identify keeps the room-private route, the only one there is."""
        room, slash, _nick = ident.handle.partition("/")
        if slash and ident.account and ident.verified_by == VERIFIED_JID and self.is_room(room):
            return ident.account
        return ident.handle

    def hold(self, room: str, nick: str) -> Coroutine[Any, Any, bool] | None:
        """None: handle a command from ``room/nick`` now.  While the room is being
        re-read, a coroutine instead that waits until it is and then says
        whether the command may still run: not if its nick left (or changed
        hands) meanwhile, or the bot rejoined, since the nick may be someone
        else's now."""
        state = self._rooms.get(room)
        review = state.review if state is not None else None
        if state is None or review is None:
            return None
        known = state.occupants.get(nick)
        serial = known.serial if known is not None else None

        async def released() -> bool:
            await review.done.wait()
            now = state.occupants.get(nick)
            if (now.serial if now is not None else None) != serial:
                log.info("xmpp %s: not running a command from %s/%s held while the room was re-read: "
                         "that nick left meanwhile", self.network, room, nick)
                return False
            return True
        return released()

    # --- re-reading a room ------------------------------------------------------------

    def _shown(self, state: _RoomState) -> int:
        return sum(1 for o in state.occupants.values() if o.real_jid)

    def _stop_trusting(self, room: str, why: str) -> None:
        state = self._rooms[room]
        forgotten = self._shown(state)
        for occupant in state.occupants.values():
            occupant.real_jid = None
        log.info("xmpp %s: %s %s; forgot %d occupant JID(s): privileged commands from it are refused "
                 "while it does not show me real JIDs", self.network, room, why, forgotten)

    async def _review(self, room: str, state: _RoomState, review: _Review) -> None:
        try:
            while review.disco or review.resync:
                if review.disco:
                    review.disco = False
                    if await self._anonymity_changed(room, state):
                        review.resync = True
                else:
                    review.resync = False
                    await self._resync(room, state)
        finally:
            state.review = None
            review.done.set()

    async def _anonymity_changed(self, room: str, state: _RoomState) -> bool:
        """After a 104: ask the room whether it still shows real JIDs to
        everyone.  If that changed, or the room cannot say, what we knew is
        forgotten and True asks for a re-read."""
        non_anonymous = await self._reader.non_anonymous(room)
        if non_anonymous is not None and non_anonymous == state.non_anonymous:
            return False                          # an unrelated change: what we knew still holds
        if non_anonymous:
            state.non_anonymous = True
            log.info("xmpp %s: %s is now non-anonymous (disco#info); re-reading its occupants",
                     self.network, room)
        else:
            state.non_anonymous = False
            self._stop_trusting(room, "is now semi-anonymous (disco#info)" if non_anonymous is False
                                else "changed its configuration and may hide real JIDs now")
        return True

    async def _resync(self, room: str, state: _RoomState) -> None:
        """Re-read the occupants as the room shows them to us now; JIDs known
        before are forgotten first, so only what the room says now counts."""
        nick = state.nick
        if not state.tracking or nick is None:
            return                                # a new join learns the room afresh anyway
        for occupant in state.occupants.values():
            occupant.real_jid = None
        if await self._reader.reread(room, nick):
            log.info("xmpp %s: re-read the occupants of %s: it shows me %d real JID(s)",
                     self.network, room, self._shown(state))
