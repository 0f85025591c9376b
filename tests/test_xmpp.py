"""The XMPP front-end against a real Prosody on 127.0.0.1, with a real
slixmpp client playing the human, wired exactly as the bot wires it:
Router(Dispatcher(engine, directory, registry)).serve(XmppTransport(cfg)).
The parts that need no server are in test_xmpp_units.py and
test_xmpp_roomtrust.py."""
from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from bot.access import Directory, User
from bot.chat import Identity, Message, Room, TransportError
from bot.commands import Dispatcher, default_registry
from bot.router import Router
from bot.transports.xmpp import XmppConfig, XmppTransport
from engine.engine import Engine
from tests.engine_fixtures import EngineFactory
from tests.servers.tls import ThrowawayCA
from tests.servers.xmpp import CuttableProxy, Human, Prosody, Received

NET = "test"
NICK = "releasebot"
WAITS = """
name: waits
steps:
  - participant: hold
"""
HINT = "say 'help' for the list of commands"


class Bot:
    """One running XmppTransport and everything it dispatched."""

    def __init__(self, transport: XmppTransport, engine: Engine) -> None:
        self.transport = transport
        self.engine = engine
        self.dispatched: list[Message] = []


@pytest.fixture
async def engine(engines: EngineFactory) -> Engine:
    return await engines({"waits": WAITS})


@pytest.fixture
async def start_bot(prosody: Prosody, engine: Engine) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    """Factory: the real bot on XMPP (alice is a known admin; bob and mallory are not users)."""
    bots: list[Bot] = []

    async def start(rooms: tuple[str, ...] = (), port: int | None = None, **overrides: Any) -> Bot:
        settings: dict[str, Any] = dict(name=NET, jid=prosody.jid("bot"), password="botpw",
                                        host="127.0.0.1", port=port or prosody.port, tls="plaintext",
                                        rooms=rooms, nick=NICK, reconnect_min=0.2, reconnect_max=2.0)
        settings.update(overrides)
        transport = XmppTransport(XmppConfig(**settings))
        directory = Directory([User("alice", xmpp_jids=(prosody.jid("alice"),),
                                    roles={"*": frozenset({"admins"})})])
        router = Router(Dispatcher(engine=engine, directory=directory, registry=default_registry()))
        bot = Bot(transport, engine)
        real_answer = router.answer

        async def answer(t: Any, message: Message) -> None:   # record, then answer as usual
            bot.dispatched.append(message)
            await real_answer(t, message)
        router.answer = answer  # type: ignore[method-assign,assignment]
        bots.append(bot)
        await router.serve(transport)
        return bot

    yield start
    for bot in bots:
        await bot.transport.close()


def from_room(room: str, nick: str = NICK) -> Callable[[Received], bool]:
    return lambda m: m.type == "groupchat" and m.sender == f"{room}/{nick}" and not m.delayed


def from_bot_directly(prosody: Prosody) -> Callable[[Received], bool]:
    """A direct message from the bot's own JID (not a private message through a room)."""
    return lambda m: m.type == "chat" and m.sender.startswith(prosody.jid("bot") + "/")


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- direct messages ------------------------------------------------------------

@pytest.mark.servers
async def test_direct_messages_are_commands_and_whoami_shows_the_verified_bare_jid(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    await start_bot()
    alice: Human = await xmpp_human("alice")
    bot = prosody.jid("bot")
    assert (await alice.ask(bot, "help")).startswith("commands: ")
    assert await alice.ask(bot, "whoami") == (
        "alice@localhost/test on test is alice, verified by server-verified JID; roles: *: admins")
    assert await alice.ask(bot, "!ps") == "no running, waiting or failed instances"   # prefix tolerated
    assert (await alice.ask(bot, "frobnicate")).startswith("unknown command 'frobnicate'")


@pytest.mark.servers
async def test_unknown_jid_is_not_authorised_and_it_is_logged(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    await start_bot()
    mallory: Human = await xmpp_human("mallory")
    caplog.set_level(logging.INFO)
    reply = await mallory.ask(prosody.jid("bot"), "ps")
    assert reply.startswith("not authorised: ps needs a verified, known user (mallory@localhost/test on test: "
                            "account 'mallory@localhost' (server-verified JID) is not a known user)")
    refusals = [r for r in caplog.records if r.name == "bot.commands" and r.levelno == logging.WARNING]
    assert any("refused 'ps' from xmpp:test:mallory@localhost/test" in r.getMessage() for r in refusals)
    assert "botpw" not in caplog.text


@pytest.mark.servers
async def test_commands_sent_while_the_bot_was_offline_are_not_run_late(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    alice: Human = await xmpp_human("alice")
    alice.dm(prosody.jid("bot"), "launch waits")     # the server stores it (mod_offline)
    await asyncio.sleep(0.1)
    bot = await start_bot()
    reply = await alice.expect(lambda m: m.type == "chat")
    assert reply.body == "I was offline when you sent 'launch waits'; not run: send it again if you still want it"
    assert bot.dispatched == [] and await bot.engine.instances(include_finished=True) == []


# --- rooms ------------------------------------------------------------------------

@pytest.mark.servers
async def test_room_commands_by_prefix_and_by_nick_answered_in_the_room(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    bot = await start_bot(rooms=(ops,))      # the bot creates the room: it owns it, sees real JIDs
    alice: Human = await xmpp_human("alice")
    await alice.join(ops)

    alice.say(ops, "!whoami")
    assert (await alice.expect(from_room(ops))).body == (       # room answers are addressed
        "alice: ops@conference.localhost/alice on test is alice, verified by server-verified JID; roles: *: admins")
    alice.say(ops, "releasebot: ps")                 # privileged, and the room shows real JIDs
    assert (await alice.expect(from_room(ops))).body == "alice: no running, waiting or failed instances"
    alice.say(ops, "ReleaseBot, help whoami")
    assert (await alice.expect(from_room(ops))).body.startswith("alice: whoami - who the bot thinks you are")

    alice.dm(f"{ops}/{NICK}", "whoami")              # a private message through the room ...
    private = await alice.expect(from_bot_directly(prosody))   # ... answered at her real JID
    assert private.body.startswith("ops@conference.localhost/alice on test is alice, verified by server")

    alice.say(ops, "good morning, nothing for the bot here")
    alice.say(ops, "releasebot is great")
    await asyncio.sleep(0.3)
    assert not [m for m in alice.received if m.sender == f"{ops}/{NICK}"]
    assert [(m.text, m.room) for m in bot.dispatched] == [
        ("whoami", Room("xmpp", NET, ops)), ("ps", Room("xmpp", NET, ops)),
        ("help whoami", Room("xmpp", NET, ops)), ("whoami", None)]


@pytest.mark.servers
async def test_long_room_output_goes_to_the_caller_privately(
        prosody: Prosody, start_bot, xmpp_human, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    await start_bot(rooms=(ops,))
    for _ in range(5):                               # 5 lines > Router.max_room_lines (4)
        await engine.launch("waits", {})
    alice: Human = await xmpp_human("alice")
    await alice.join(ops)
    alice.say(ops, "!ps")
    notice = await alice.expect(from_room(ops))
    assert notice.body == "alice: 5 lines, sent to you privately"
    private = await alice.expect(from_bot_directly(prosody))   # to her real JID, not to a nick
    assert sorted(line.split(" ")[0] for line in private.body.split("\n")) == ["#1", "#2", "#3", "#4", "#5"]
    assert not [m for m in await alice.quiet(0.2) if m.sender.startswith(ops)]


@pytest.mark.servers
async def test_private_output_goes_to_the_real_jid_not_to_a_nick_someone_else_took_meanwhile(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    bot = await start_bot(rooms=(ops,))              # the bot owns the room: it sees real JIDs
    alice: Human = await xmpp_human("alice")
    mallory: Human = await xmpp_human("mallory")
    await alice.join(ops)
    alice.say(ops, "!whoami")
    await alice.expect(from_room(ops))
    asker = bot.dispatched[0].sender                 # what the router sends long output to
    assert (asker.handle, asker.account) == (f"{ops}/alice", "alice@localhost")

    await alice.leave(ops)                           # e.g. while the answer waits out a reconnect,
    await mallory.join(ops, nick="alice")            # someone else takes her nick
    await bot.transport.send(asker, "#1 publish waiting: secret release notes")
    got = await alice.expect(from_bot_directly(prosody))
    assert got.body == "#1 publish waiting: secret release notes"
    assert [m for m in await mallory.quiet(0.3) if m.type == "chat"] == []


@pytest.mark.servers
async def test_a_room_switched_to_semi_anonymous_and_back_is_trusted_only_while_it_shows_real_jids(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="bot.transports.xmpp")
    room = prosody.room("switching")
    alice: Human = await xmpp_human("alice")
    await alice.join(room)                           # alice creates and owns it ...
    await alice.configure_room(room, whois="anyone")     # ... and makes it non-anonymous
    bot = await start_bot(rooms=(room,))             # a plain participant: sees real JIDs only now
    refused = (f"alice: not authorised: {room} does not show me real JIDs, so I cannot tell who you are; "
               "send me a direct message instead")

    alice.say(room, "!ps")
    assert (await alice.expect(from_room(room))).body == "alice: no running, waiting or failed instances"

    await alice.configure_room(room, whois="moderators")   # semi-anonymous: status 173
    alice.say(room, "!ps")                           # alice's JID learned before must not count
    assert (await alice.expect(from_room(room))).body == refused
    assert "now semi-anonymous (status 173); forgot 1 occupant JID(s)" in caplog.text

    await alice.configure_room(room, whois="anyone")       # non-anonymous again: status 172
    alice.say(room, "!ps")                           # held until the bot has re-read the occupants
    assert (await alice.expect(from_room(room))).body == "alice: no running, waiting or failed instances"
    assert f"re-read the occupants of {room}: it shows me 1 real JID(s)" in caplog.text
    assert [(m.text, m.sender.account, m.room.exposes_identities if m.room else None)
            for m in bot.dispatched] == [("ps", "alice@localhost", True), ("ps", None, False),
                                         ("ps", "alice@localhost", True)]


@pytest.mark.servers
async def test_a_server_saying_only_104_makes_the_bot_ask_the_room_whether_it_still_shows_jids(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="bot.transports.xmpp")
    room = prosody.room("vague")
    alice: Human = await xmpp_human("alice")
    await alice.join(room)
    await alice.configure_room(room, whois="anyone")
    bot = await start_bot(rooms=(room,))

    def only_104(stanza: Any) -> Any:                # a server that says only "configuration changed"
        if stanza.name == "message" and stanza["from"].full == room:
            if stanza["muc"]["status_codes"] & {172, 173, 174}:
                stanza["muc"]["status_codes"] = {104}
        return stanza
    bot.transport._client.add_filter("in", only_104)
    accepted = "alice: no running, waiting or failed instances"

    await alice.configure_room(room, roomname="Release talk")   # unrelated: still trusted, no re-read
    alice.say(room, "!ps")
    assert (await alice.expect(from_room(room))).body == accepted
    await alice.configure_room(room, whois="moderators")        # arrives as a bare 104
    alice.say(room, "!ps")
    assert (await alice.expect(from_room(room))).body.startswith("alice: not authorised: ")
    assert "is now semi-anonymous (disco#info); forgot 1 occupant JID(s)" in caplog.text
    await alice.configure_room(room, whois="anyone")
    alice.say(room, "!ps")
    assert (await alice.expect(from_room(room))).body == accepted
    assert "is now non-anonymous (disco#info)" in caplog.text
    assert caplog.text.count("re-read the occupants of") == 2    # after each real change only


@pytest.mark.servers
async def test_a_command_held_during_a_room_review_is_dropped_if_its_nick_changed_hands_meanwhile(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="bot.transports.xmpp")
    room = prosody.room("handover")
    alice: Human = await xmpp_human("alice")
    mallory: Human = await xmpp_human("mallory")
    await alice.join(room)                           # alice owns it; semi-anonymous by default
    bot = await start_bot(rooms=(room,))
    await mallory.join(room, nick="carol")
    gate = asyncio.Event()
    rooms = bot.transport._rooms
    reread = rooms.reread

    async def slow_reread(r: str, nick: str) -> bool:     # the re-read takes a while: the test says when
        await gate.wait()
        return await reread(r, nick)
    rooms.reread = slow_reread  # type: ignore[method-assign]

    await alice.configure_room(room, whois="anyone")  # 172: commands are held until the room is re-read
    await wait_until(lambda: bot.transport.trust.reviewing(room))
    mallory.say(room, "!ps")                          # held; the room relays it before mallory's leaving
    await mallory.leave(room)
    await alice.leave(room)
    await alice.join(room, nick="carol")              # the nick is alice's now, and the room shows her JID
    gate.set()
    dropped = "held while the room was re-read: that nick left meanwhile"
    await wait_until(lambda: bool(bot.dispatched) or dropped in caplog.text)
    assert bot.dispatched == []                       # mallory's command never ran, as alice or anyone
    assert dropped in caplog.text
    alice.say(room, "!ps")                            # carol really is alice now: had it run, it was as her
    assert (await alice.expect(from_room(room))).body == "carol: no running, waiting or failed instances"
    assert [(m.text, m.sender.account) for m in bot.dispatched] == [("ps", "alice@localhost")]


@pytest.mark.servers
async def test_semi_anonymous_room_of_someone_else_refuses_privileged_commands(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    hidden = prosody.room("hidden")
    alice: Human = await xmpp_human("alice")
    await alice.join(hidden)                         # alice creates it: she owns it, the bot will not
    alice.say(hidden, "!whoami")                     # before the bot is there: history, never answered
    bot = await start_bot(rooms=(hidden,))

    alice.say(hidden, "!ps")
    assert (await alice.expect(from_room(hidden))).body == (
        "alice: not authorised: hidden@conference.localhost does not show me real JIDs, so I cannot tell "
        "who you are; send me a direct message instead")
    alice.say(hidden, "!whoami")
    assert (await alice.expect(from_room(hidden))).body == (
        "alice: hidden@conference.localhost/alice on test: not identified (not verified)")
    assert [(m.text, m.sender.account, m.room.exposes_identities if m.room else None)
            for m in bot.dispatched] == [("ps", None, False), ("whoami", None, False)]
    # the same person in a direct message is recognised
    assert (await alice.ask(prosody.jid("bot"), "whoami")).startswith("alice@localhost/test on test is alice")


@pytest.mark.servers
async def test_the_bot_never_answers_its_own_reflected_room_messages(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    bot = await start_bot(rooms=(ops,))
    alice: Human = await xmpp_human("alice")
    await alice.join(ops)
    room = Room("xmpp", NET, ops)
    await bot.transport.send(room, "!help")                   # looks like a command ...
    await bot.transport.send(room, "releasebot: whoami")      # ... and addresses the bot
    got = await alice.quiet(0.5)
    assert [(m.sender, m.body) for m in got] == [(f"{ops}/{NICK}", "!help"),
                                                 (f"{ops}/{NICK}", "releasebot: whoami")]
    assert bot.dispatched == []


@pytest.mark.servers
async def test_a_bare_prefix_or_address_is_answered_with_a_hint(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    await start_bot(rooms=(ops,))
    alice: Human = await xmpp_human("alice")
    await alice.join(ops)
    assert await alice.ask(prosody.jid("bot"), "!") == HINT
    alice.say(ops, "!")
    assert (await alice.expect(from_room(ops))).body == f"alice: {HINT}"
    alice.say(ops, "releasebot:")
    assert (await alice.expect(from_room(ops))).body == f"alice: {HINT}"


@pytest.mark.servers
async def test_the_bot_kicked_from_a_room_drops_what_it_had_queued_for_it(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="bot.transports.xmpp")
    room = prosody.room("strict")
    alice: Human = await xmpp_human("alice")
    await alice.join(room)                           # alice owns the room
    bot = await start_bot(rooms=(room,), rate=2.0, burst=1)
    await wait_until(lambda: bot.transport.undelivered == 0)
    for i in range(5):                               # one goes now, the others wait for tokens
        await bot.transport.send(Room("xmpp", NET, room), f"line {i}")
    await bot.transport.send(Identity("xmpp", NET, prosody.jid("alice")), "to alice directly")
    await alice.kick(room, NICK)
    await wait_until(lambda: f"I am no longer in {room}; dropped" in caplog.text)
    assert re.search(rf"I am no longer in {room}; dropped [2-4] queued message", caplog.text)
    assert [line.to for _, line in bot.transport._delivery.queue] in ([prosody.jid("alice")], [])
    got = await alice.expect(lambda m: m.type == "chat")      # her own line still arrives
    assert got.body == "to alice directly"
    assert [m.body for m in alice.received if m.sender == f"{room}/{NICK}"] in ([], ["line 0"])


# --- outbound: splitting, pacing and fairness -----------------------------------------

@pytest.mark.servers
async def test_long_text_is_split_on_line_boundaries_and_paced(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(rate=20.0, burst=2, max_line_chars=200)
    alice: Human = await xmpp_human("alice")
    to_alice = Identity("xmpp", NET, prosody.jid("alice"))
    long_line = " ".join(f"w{i}" for i in range(150))         # 639 characters -> 4 messages
    short = [f"line {i:02d} " + "x" * 22 for i in range(30)]   # 30 characters: 6 to a message -> 5
    text = "\n".join(short) + "\n" + long_line
    t0 = time.monotonic()
    await bot.transport.send(to_alice, text)
    got = [await alice.expect(lambda m: m.type == "chat") for _ in range(5 + 4)]
    elapsed = time.monotonic() - t0
    bodies = [m.body for m in got]
    assert [b.split("\n") for b in bodies[:5]] == [short[i:i + 6] for i in range(0, 30, 6)]
    assert " ".join(bodies[5:]) == long_line and all(len(b) <= 200 for b in bodies)
    assert elapsed >= (9 - 2) / 20 * 0.9                        # burst 2, then 20 messages/s
    assert await alice.quiet(0.2) == []


@pytest.mark.servers
async def test_a_long_answer_to_one_person_does_not_hold_up_a_short_one_to_another(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(rate=40.0, burst=1, max_line_chars=100)
    alice: Human = await xmpp_human("alice")
    bob: Human = await xmpp_human("bob")
    long_answer = "\n".join(f"line {i:02d} " + "x" * 80 for i in range(20))   # 20 messages: 0.5s paced
    await bot.transport.send(Identity("xmpp", NET, prosody.jid("alice")), long_answer)
    t0 = time.monotonic()
    await bot.transport.send(Identity("xmpp", NET, prosody.jid("bob")), "one line")
    assert (await bob.expect(lambda m: m.type == "chat")).body == "one line"
    assert time.monotonic() - t0 < 0.2                          # two pacing slots, not twenty
    got = [(await alice.expect(lambda m: m.type == "chat")).body for _ in range(20)]
    assert got == long_answer.split("\n")


# --- reconnection ---------------------------------------------------------------

@pytest.mark.servers
async def test_prosody_killed_and_restarted_bot_reconnects_rejoins_and_delivers_queued_lines_once(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    ops = prosody.room("ops")
    bot = await start_bot(rooms=(ops,))
    alice: Human = await xmpp_human("alice")
    await alice.join(ops)
    assert await alice.ask(prosody.jid("bot"), "help")
    await wait_until(lambda: bot.transport.undelivered == 0)     # nothing in flight at the crash

    prosody.kill()
    await wait_until(lambda: not bot.transport.online.is_set())
    to_alice, room = Identity("xmpp", NET, prosody.jid("alice")), Room("xmpp", NET, ops)
    for i in range(5):
        await bot.transport.send(to_alice, f"queued {i}")
        await bot.transport.send(room, f"room queued {i}")
    assert bot.transport.undelivered == 10
    prosody.start()

    alice = Human(prosody, "alice")
    await alice.connect()
    try:
        # Room lines reach alice live or, if the bot got there first, as the new room's history.
        await alice.join(ops, history=50)
        await wait_until(lambda: bot.transport.online.is_set() and bot.transport.undelivered == 0)
        await asyncio.sleep(0.3)
        direct = [m.body for m in alice.received if m.type == "chat"]
        in_room = [m.body for m in alice.received if m.type == "groupchat" and m.sender == f"{ops}/{NICK}"]
        assert direct == [f"queued {i}" for i in range(5)]          # once each, in order
        assert in_room == [f"room queued {i}" for i in range(5)]
        assert bot.transport.connections == 2                     # a new session: re-authenticated
        alice.received.clear()
        alice.say(ops, "!whoami")                                # the bot is back in the room
        assert (await alice.expect(from_room(ops))).body.startswith("alice: ops@conference.localhost/alice on test")
    finally:
        await alice.close()


@pytest.mark.servers
async def test_network_loss_resumes_the_stream_and_delivers_queued_lines_once(
        prosody: Prosody, start_bot, xmpp_human, caplog) -> None:  # type: ignore[no-untyped-def]
    proxy = CuttableProxy(prosody.port)
    await proxy.start()
    try:
        ops = prosody.room("ops")
        bot = await start_bot(rooms=(ops,), port=proxy.port)
        alice: Human = await xmpp_human("alice")
        await alice.join(ops)
        assert await alice.ask(prosody.jid("bot"), "help")
        await wait_until(lambda: bot.transport.undelivered == 0)
        caplog.set_level(logging.INFO, logger="bot.transports.xmpp")

        proxy.cut()
        await wait_until(lambda: not bot.transport.online.is_set())
        to_alice, room = Identity("xmpp", NET, prosody.jid("alice")), Room("xmpp", NET, ops)
        for i in range(3):
            await bot.transport.send(to_alice, f"queued {i}")
            await bot.transport.send(room, f"room queued {i}")
        await asyncio.sleep(0.3)                  # a reconnect attempt or two fail meanwhile
        proxy.up = True

        await wait_until(lambda: bot.transport.online.is_set() and bot.transport.undelivered == 0)
        await asyncio.sleep(0.3)
        assert [m.body for m in alice.received if m.type == "chat"] == [f"queued {i}" for i in range(3)]
        assert [m.body for m in alice.received if m.sender == f"{ops}/{NICK}"] == [
            f"room queued {i}" for i in range(3)]
        assert "stream resumed" in caplog.text and bot.transport.connections == 1
        alice.received.clear()
        alice.say(ops, "!whoami")                 # still in the room, still seeing real JIDs
        assert (await alice.expect(from_room(ops))).body.startswith(
            "alice: ops@conference.localhost/alice on test is alice")
    finally:
        await proxy.close()


# --- start-up failures and configuration ---------------------------------------------

@pytest.mark.servers
async def test_tls_is_required_by_default_and_a_bad_password_fails_start(prosody: Prosody, engine) -> None:  # type: ignore[no-untyped-def]
    async def nothing(message: Message) -> None:
        raise AssertionError("no message expected")

    base = dict(name=NET, jid=prosody.jid("bot"), host="127.0.0.1", port=prosody.port)
    default_tls = XmppTransport(XmppConfig(password="botpw", **base))       # type: ignore[arg-type]
    with pytest.raises(TransportError, match="offered no TLS .* refusing to send the password unencrypted"):
        await default_tls.start(nothing)
    wrong = XmppTransport(XmppConfig(password="nope", tls="plaintext", **base))   # type: ignore[arg-type]
    with pytest.raises(TransportError, match="authentication as bot@localhost failed") as info:
        await wrong.start(nothing)
    assert "nope" not in str(info.value)


@pytest.mark.servers
async def test_starttls_with_ca_file_verifies_the_server_and_commands_are_answered(
        prosody_tls: Prosody, engine: Engine, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "bot.transports.xmpp")
    assert prosody_tls.ca_file is not None
    transport = XmppTransport(XmppConfig(name=NET, jid=prosody_tls.jid("bot"), password="botpw", host="127.0.0.1",
                                         port=prosody_tls.port, ca_file=str(prosody_tls.ca_file),
                                         reconnect_min=0.2, reconnect_max=2.0))     # tls: starttls (default)
    directory = Directory([User("alice", xmpp_jids=(prosody_tls.jid("alice"),), roles={"*": frozenset({"admins"})})])
    alice = Human(prosody_tls, "alice")
    try:
        await Router(Dispatcher(engine=engine, directory=directory, registry=default_registry())).serve(transport)
        assert transport.online.is_set()
        assert f"xmpp {NET}: session started as bot@localhost/" in caplog.text and "(TLS: yes)" in caplog.text
        await alice.connect()                            # the human needs the CA too (STARTTLS is required)
        assert await alice.ask(prosody_tls.jid("bot"), "whoami") == (
            "alice@localhost/test on test is alice, verified by server-verified JID; roles: *: admins")
        assert await alice.ask(prosody_tls.jid("bot"), "ps") == "no running, waiting or failed instances"
    finally:
        await alice.close()
        await transport.close()


@pytest.mark.servers
async def test_starttls_without_the_ca_refuses_the_server_with_a_clear_error(
        prosody_tls: Prosody, caplog) -> None:  # type: ignore[no-untyped-def]
    async def nothing(message: Message) -> None:
        raise AssertionError("no message expected")

    base = dict(name=NET, jid=prosody_tls.jid("bot"), password="botpw", host="127.0.0.1", port=prosody_tls.port)
    untrusted = XmppTransport(XmppConfig(**base))                          # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        await untrusted.start(nothing)
    assert time.monotonic() - started < 2                                  # at once, not after retries
    assert str(info.value) == (
        f"xmpp {NET}: TLS: refused the certificate of localhost (unable to get local issuer certificate); "
        "checked against the system's CAs: set ca_file to the CA that signed it")
    assert not untrusted.online.is_set()
    assert "botpw" not in caplog.text

    # a CA file that does not vouch for this server: refused the same way, and it says which file
    other = Path(tempfile.mkdtemp(prefix="other-ca-"))
    try:
        stranger = ThrowawayCA.create(other)
        wrong_ca = XmppTransport(XmppConfig(ca_file=str(stranger.ca_file), **base))   # type: ignore[arg-type]
        with pytest.raises(TransportError, match=r"TLS: refused the certificate of localhost \(.*\); "
                                                 rf"checked against ca_file {stranger.ca_file}"):
            await wrong_ca.start(nothing)
    finally:
        shutil.rmtree(other, ignore_errors=True)
