"""The slixmpp side of rooms: joining them, asking and re-reading them for
``RoomTrust``, and turning their presences and status messages into its calls."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from bot.transports.xmpp.config import XmppConfig
from bot.transports.xmpp.roomtrust import (NICK_CHANGED, ROOM_CONFIG_CODES, ROOM_CREATED, Departure,
                                           RoomTrust, Spawn)

log = logging.getLogger(__name__)

JOIN_ATTEMPTS = 3                 # the nick, then with "_" and "__" appended


class Rooms:
    """Joins the configured rooms and keeps ``trust`` told what they show.

    ``client()`` is the slixmpp client; ``session()`` the current session's
    number, or None while there is none; ``departed`` hears who left a room."""

    def __init__(self, config: XmppConfig, room_jids: list[str], client: Callable[[], Any],
                 session: Callable[[], int | None], departed: Callable[[Departure], None],
                 spawn: Spawn) -> None:
        self.config = config
        self.network = config.name
        self.room_jids = room_jids
        self._client = client
        self._session = session
        self._departed = departed
        self.trust = RoomTrust(config.name, room_jids, self, spawn)

    # --- joining ----------------------------------------------------------------------

    async def join(self, room: str) -> bool:
        """Join ``room`` (creating it if need be); False if that failed."""
        from slixmpp.exceptions import PresenceError
        from slixmpp.jid import JID

        muc = self._client().plugin["xep_0045"]
        nick = self.config.room_nick
        for _ in range(JOIN_ATTEMPTS):
            self.trust.joining(room)
            try:
                pres, _subject, _occupants, _history = await muc.join_muc_wait(
                    JID(room), nick, maxstanzas=0, timeout=self.config.join_timeout)
            except PresenceError as exc:
                if exc.condition == "conflict":
                    nick += "_"
                    continue
                log.warning("xmpp %s: cannot join %s: %s", self.network, room, exc.condition)
                break
            except asyncio.TimeoutError:
                log.warning("xmpp %s: no answer joining %s after %.0fs", self.network, room,
                            self.config.join_timeout)
                break
            codes = set(pres["muc"]["status_codes"])
            self.trust.joined(room, pres["from"].resource, codes)
            created = ROOM_CREATED in codes
            if created:
                await self._configure_new_room(room)
            log.info("xmpp %s: joined %s as %s%s", self.network, room, pres["from"].resource,
                     " (created it: I own it and see real JIDs)" if created else "")
            return True
        else:
            log.warning("xmpp %s: cannot join %s: nickname %s and variants are taken",
                        self.network, room, self.config.room_nick)
        self.trust.join_failed(room)
        return False

    async def _configure_new_room(self, room: str) -> None:
        """Accept the default configuration ("instant room"): on servers that
        lock new rooms until configured, this unlocks it for everyone else."""
        from slixmpp.exceptions import IqError, IqTimeout

        client = self._client()
        form = client.plugin["xep_0004"].make_form(ftype="submit")
        try:
            await client.plugin["xep_0045"].set_room_config(room, form, timeout=self.config.join_timeout)
        except (IqError, IqTimeout) as exc:
            log.warning("xmpp %s: could not configure the new room %s: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))

    # --- RoomReader: what RoomTrust asks ---------------------------------------------------

    async def non_anonymous(self, room: str) -> bool | None:
        from slixmpp.exceptions import IqError, IqTimeout

        try:
            info = await self._client().plugin["xep_0030"].get_info(jid=room, timeout=self.config.join_timeout)
            return "muc_nonanonymous" in info["disco_info"]["features"]
        except (IqError, IqTimeout) as exc:
            log.warning("xmpp %s: cannot ask %s about its configuration: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))
        except Exception as exc:   # e.g. the session died meanwhile: a new session rejoins afresh
            log.debug("xmpp %s: disco#info of %s: %r", self.network, room, exc)
        return None

    async def reread(self, room: str, nick: str) -> bool:
        """A join presence while already joined makes the server send every
        occupant's presence again (Prosody treats it as a desynced client; the
        others see only a presence update from the bot, no leave and join)."""
        from slixmpp.exceptions import PresenceError
        from slixmpp.jid import JID

        session = self._session()
        if session is None:
            return False                          # a new session joins afresh anyway
        try:
            await self._client().plugin["xep_0045"].join_muc_wait(JID(room), nick, maxstanzas=0,
                                                                   timeout=self.config.join_timeout)
        except (PresenceError, asyncio.TimeoutError) as exc:
            log.warning("xmpp %s: could not re-read the occupants of %s: %s", self.network, room,
                        getattr(exc, "condition", "timeout"))
            return False
        except Exception as exc:   # e.g. the session died meanwhile: a new session rejoins afresh
            log.debug("xmpp %s: re-reading %s: %r", self.network, room, exc)
            return False
        return self._session() == session

    # --- stanzas in -------------------------------------------------------------------------

    def presence(self, pres: Any) -> None:
        """An occupant presence (slixmpp's ``groupchat_presence``)."""
        if pres["type"] == "error":
            return
        muc = pres["muc"]
        real = muc["jid"]
        codes = set(muc["status_codes"])
        departure = self.trust.presence(
            pres["from"].bare, pres["from"].resource, available=pres["type"] != "unavailable",
            real_jid=real.bare or None, codes=codes,
            new_nick=(muc["item_nick"] or None) if NICK_CHANGED in codes else None)
        if departure is not None:
            self._departed(departure)

    def config_status(self, msg: Any) -> None:
        """A status message from the room itself, e.g. 173 after its owner hid real JIDs."""
        if msg["from"].resource:
            return
        codes = set(msg["muc"]["status_codes"]) & ROOM_CONFIG_CODES
        if codes:
            self.trust.config_changed(msg["from"].bare, codes)
