"""Room trust without a server: presences and status codes fed as plain
values, the server's answers (disco#info, a re-read) played by a fake reader."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

import pytest

from bot.chat import UNVERIFIED, VERIFIED_JID, Identity
from bot.transports.xmpp.roomtrust import Departure, RoomTrust

ROOM = "ops@conference.example.org"
OTHER = "other@conference.example.org"
BOT = "releasebot"
ALICE, MALLORY = "alice@example.org", "mallory@example.org"
LOGGER = "bot.transports.xmpp"


class Reader:
    """The server, as room trust asks it.  ``disco`` is what disco#info says;
    a re-read replays ``occupants`` (nick -> real JID or None) as presences,
    after ``gate`` opens (so a test can act while the room is being re-read)."""

    def __init__(self) -> None:
        self.trust: RoomTrust | None = None
        self.disco: bool | None = True
        self.occupants: dict[str, str | None] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked: list[str] = []
        self.rereads: list[str] = []

    async def non_anonymous(self, room: str) -> bool | None:
        self.asked.append(room)
        return self.disco

    async def reread(self, room: str, nick: str) -> bool:
        await self.gate.wait()
        self.rereads.append(room)
        assert self.trust is not None
        for who, real in self.occupants.items():
            self.trust.presence(room, who, available=True, real_jid=real)
        self.trust.presence(room, nick, available=True, codes={110})
        return True


def make(rooms: tuple[str, ...] = (ROOM,)) -> tuple[RoomTrust, Reader, list[asyncio.Task[Any]]]:
    reader = Reader()
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, None], what: str) -> None:
        tasks.append(asyncio.ensure_future(coro))
    trust = RoomTrust("net", rooms, reader, spawn)
    reader.trust = trust
    return trust, reader, tasks


def join(trust: RoomTrust, occupants: dict[str, str | None], *, non_anonymous: bool = False,
         room: str = ROOM) -> None:
    """A join as the server does it: the occupants' presences, then our own."""
    trust.joining(room)
    for nick, real in occupants.items():
        trust.presence(room, nick, available=True, real_jid=real)
    codes = {110, 100} if non_anonymous else {110}
    trust.presence(room, BOT, available=True, codes=codes)
    trust.joined(room, BOT, codes)


def account(trust: RoomTrust, nick: str, room: str = ROOM) -> str | None:
    return trust.occupant(room, nick).account


async def settle(tasks: list[asyncio.Task[Any]]) -> None:
    while tasks:
        await tasks.pop(0)


# --- who is shown with which JID --------------------------------------------------

def test_an_occupant_counts_as_their_real_jid_only_while_the_room_shows_it() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE, "bob": None}, non_anonymous=True)
    assert trust.occupant(ROOM, "alice") == Identity("xmpp", "net", f"{ROOM}/alice", account=ALICE,
                                                     verified_by=VERIFIED_JID)
    assert trust.occupant(ROOM, "bob") == Identity("xmpp", "net", f"{ROOM}/bob", verified_by=UNVERIFIED)
    assert account(trust, "nobody") is None
    trust.presence(ROOM, "alice", available=True, real_jid=None)     # a presence without it: forgotten
    assert account(trust, "alice") is None
    assert trust.present(ROOM) == {"alice", "bob"}                    # not the bot itself


def test_a_nick_someone_else_takes_never_inherits_the_jid_of_who_held_it() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    assert trust.presence(ROOM, "alice", available=False) == Departure(ROOM, "alice")
    assert account(trust, "alice") is None
    trust.presence(ROOM, "alice", available=True, real_jid=None)      # mallory, JID hidden
    assert account(trust, "alice") is None
    trust.presence(ROOM, "alice", available=True, real_jid=MALLORY)   # or shown: then it is hers
    assert account(trust, "alice") == MALLORY


def test_presences_count_only_for_our_rooms_while_joining_or_joined() -> None:
    trust, _reader, _ = make()
    trust.presence(ROOM, "alice", available=True, real_jid=ALICE)     # before the join
    trust.presence(OTHER, "alice", available=True, real_jid=ALICE)    # not our room
    assert account(trust, "alice") is None and not trust.is_room(OTHER)
    assert trust.our_nick(ROOM) is None
    join(trust, {})
    assert trust.our_nick(ROOM) == BOT and account(trust, "alice") is None


def test_a_rejoin_learns_the_room_afresh() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    join(trust, {"alice": None})                                      # a new session: JIDs now hidden
    assert account(trust, "alice") is None
    trust.joining(ROOM)
    trust.join_failed(ROOM)
    assert trust.our_nick(ROOM) is None and trust.present(ROOM) == set()


def test_the_bot_leaving_forgets_the_room_and_a_nick_change_follows_the_occupant() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE, "bob": None}, non_anonymous=True)
    assert trust.presence(ROOM, "bob", available=False, codes={303}, new_nick="robert") == \
        Departure(ROOM, "bob", "robert")
    assert trust.presence(ROOM, BOT, available=False, codes={110, 303}, new_nick="rb") is None
    assert trust.our_nick(ROOM) == "rb"                               # our own nick changed, still in
    assert trust.presence(ROOM, "rb", available=False, codes={110, 307}) == Departure(ROOM, None)   # kicked
    assert trust.our_nick(ROOM) is None and account(trust, "alice") is None
    trust.presence(ROOM, "alice", available=True, real_jid=ALICE)     # not in it: nothing counts
    assert account(trust, "alice") is None


def test_only_our_own_nick_can_say_the_bot_left_and_a_shutdown_is_no_departure() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE, "mallory": None}, non_anonymous=True)
    trust.presence(ROOM, "mallory", available=False, codes={110, 307})   # not our nick: mallory left
    trust.presence(ROOM, "mallory", available=True, codes={110})          # and cannot become us
    assert trust.our_nick(ROOM) == BOT and account(trust, "alice") == ALICE
    assert trust.presence(ROOM, BOT, available=False, codes={110, 332}) is None   # rejoined next session
    assert trust.our_nick(ROOM) is None and account(trust, "alice") is None


def test_private_output_goes_to_the_real_jid_never_to_a_room_nick_that_has_one() -> None:
    trust, _reader, _ = make()
    join(trust, {"alice": ALICE, "bob": None}, non_anonymous=True)
    assert trust.private_address(trust.occupant(ROOM, "alice")) == ALICE
    assert trust.private_address(trust.occupant(ROOM, "bob")) == f"{ROOM}/bob"    # the only route
    direct = Identity("xmpp", "net", f"{ALICE}/laptop", account=ALICE, verified_by=VERIFIED_JID)
    assert trust.private_address(direct) == f"{ALICE}/laptop"
    # only our rooms' occupants are routed to a JID: elsewhere "x/y" is a full JID, sent as it is
    elsewhere = Identity("xmpp", "net", f"{OTHER}/alice", account=ALICE, verified_by=VERIFIED_JID)
    assert trust.private_address(elsewhere) == f"{OTHER}/alice"


# --- the room's configuration changes ------------------------------------------------

async def test_173_forgets_every_jid_at_once_and_a_reread_shows_what_remains(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    trust, reader, tasks = make()
    join(trust, {"alice": ALICE, "bob": None}, non_anonymous=True)
    reader.occupants = {"alice": None, "bob": None}                   # we are no moderator here
    trust.config_changed(ROOM, {173})
    assert account(trust, "alice") is None                            # before any await: the next
    assert trust.reviewing(ROOM)                                      # command is judged by it
    await settle(tasks)
    assert not trust.reviewing(ROOM) and account(trust, "alice") is None
    assert reader.rereads == [ROOM] and reader.asked == []
    assert f"{ROOM} is now semi-anonymous (status 173); forgot 1 occupant JID(s)" in caplog.text
    assert f"re-read the occupants of {ROOM}: it shows me 0 real JID(s)" in caplog.text


async def test_174_as_a_moderator_keeps_seeing_jids_after_the_reread(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    trust, reader, tasks = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    reader.occupants = {"alice": ALICE}                               # the room still shows us
    trust.presence(ROOM, "alice", available=True, real_jid=ALICE, codes={174})   # in a presence too
    assert account(trust, "alice") is None
    await settle(tasks)
    assert account(trust, "alice") == ALICE
    assert "is now fully-anonymous (status 174)" in caplog.text


async def test_172_rereads_the_room_and_then_trusts_it() -> None:
    trust, reader, tasks = make()
    join(trust, {"alice": None})
    reader.occupants = {"alice": ALICE}
    trust.config_changed(ROOM, {172})
    await settle(tasks)
    assert account(trust, "alice") == ALICE and reader.rereads == [ROOM]


async def test_a_bare_104_asks_the_room_and_rereads_only_if_who_sees_jids_changed(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    trust, reader, tasks = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    reader.occupants = {"alice": ALICE}

    reader.disco = True                                               # unrelated (a new room name)
    trust.config_changed(ROOM, {104})
    await settle(tasks)
    assert reader.asked == [ROOM] and reader.rereads == [] and account(trust, "alice") == ALICE

    reader.disco, reader.occupants = False, {"alice": None}           # now semi-anonymous
    trust.config_changed(ROOM, {104})
    assert account(trust, "alice") == ALICE                           # not known until it answers
    await settle(tasks)
    assert account(trust, "alice") is None and reader.rereads == [ROOM]
    assert "is now semi-anonymous (disco#info); forgot 1 occupant JID(s)" in caplog.text

    reader.disco, reader.occupants = True, {"alice": ALICE}           # and back
    trust.config_changed(ROOM, {104})
    await settle(tasks)
    assert account(trust, "alice") == ALICE and reader.rereads == [ROOM, ROOM]
    assert "is now non-anonymous (disco#info)" in caplog.text


async def test_a_104_the_room_cannot_explain_forgets_and_rereads(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    trust, reader, tasks = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    reader.disco, reader.occupants = None, {"alice": None}            # disco#info failed
    trust.config_changed(ROOM, {104})
    await settle(tasks)
    assert account(trust, "alice") is None
    assert "changed its configuration and may hide real JIDs now; forgot 1 occupant JID(s)" in caplog.text


async def test_changes_during_a_review_join_it_and_one_reread_covers_them() -> None:
    trust, reader, tasks = make()
    join(trust, {"alice": ALICE}, non_anonymous=True)
    reader.gate.clear()
    reader.occupants = {"alice": None}
    trust.config_changed(ROOM, {104})
    trust.config_changed(ROOM, {173})                                 # while the first is pending
    assert len(tasks) == 1                                            # one review for the room
    reader.gate.set()
    await settle(tasks)
    assert reader.rereads == [ROOM] and account(trust, "alice") is None


# --- commands held while a room is re-read ------------------------------------------------

async def test_commands_are_held_during_a_review_and_released_after_it() -> None:
    trust, reader, tasks = make()
    join(trust, {"alice": None})
    assert trust.hold(ROOM, "alice") is None                          # no review: handle it now
    reader.gate.clear()
    reader.occupants = {"alice": ALICE}
    trust.config_changed(ROOM, {172})
    held = trust.hold(ROOM, "alice")
    assert held is not None
    waiting = asyncio.ensure_future(held)
    await asyncio.sleep(0)
    assert not waiting.done()
    reader.gate.set()
    assert await waiting is True and account(trust, "alice") == ALICE   # judged on the re-read room
    await settle(tasks)


@pytest.mark.parametrize("meanwhile", ["left", "changed hands", "left and came back", "bot rejoined"])
async def test_a_held_command_is_dropped_if_its_nick_left_meanwhile(meanwhile: str, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    trust, reader, tasks = make()
    join(trust, {"carol": None, "alice": ALICE})
    reader.gate.clear()
    trust.config_changed(ROOM, {172})
    held = trust.hold(ROOM, "carol")                                  # mallory, as carol
    assert held is not None
    waiting = asyncio.ensure_future(held)
    if meanwhile == "bot rejoined":                                   # a new session: nicks unknown
        join(trust, {"carol": ALICE})
    else:
        trust.presence(ROOM, "carol", available=False)
        if meanwhile == "changed hands":
            trust.presence(ROOM, "alice", available=False, codes={303}, new_nick="carol")
            trust.presence(ROOM, "carol", available=True, real_jid=ALICE)
        elif meanwhile == "left and came back":
            trust.presence(ROOM, "carol", available=True, real_jid=None)
    reader.occupants = {"carol": ALICE} if meanwhile != "left" else {}
    reader.gate.set()
    assert await waiting is False
    assert f"not running a command from {ROOM}/carol held while the room was re-read: that nick left" \
        in caplog.text
    await settle(tasks)


async def test_a_held_command_whose_sender_stayed_runs_even_if_its_presence_changed() -> None:
    trust, reader, tasks = make()
    join(trust, {"carol": None})
    reader.gate.clear()
    reader.occupants = {"carol": None}
    trust.config_changed(ROOM, {173})
    held = trust.hold(ROOM, "carol")
    assert held is not None
    waiting = asyncio.ensure_future(held)
    trust.presence(ROOM, "carol", available=True, real_jid=None)     # "away": the same occupant
    reader.gate.set()
    assert await waiting is True
    await settle(tasks)


def test_a_room_the_bot_is_not_in_ignores_configuration_changes() -> None:
    trust, _reader, tasks = make()
    trust.config_changed(ROOM, {173})
    trust.config_changed(OTHER, {173})
    assert tasks == [] and not trust.reviewing(ROOM) and trust.hold(ROOM, "alice") is None
