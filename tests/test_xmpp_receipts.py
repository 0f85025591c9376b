"""Receipts on XMPP against a real Prosody on 127.0.0.1: ``send`` returns a
future the server's confirmation settles (XEP-0198 acks, or a ping written
after the message where the server has no stream management), a bounce
fails it, a ``Person`` is reached only at their own JIDs, and a server
restarted mid-message costs a bounded number of repeats.  The mechanics
without a server are in test_xmpp_units.py."""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from bot.chat import Identity, Message, NotDelivered, Person, Room, Undeliverable
from bot.transports.xmpp import XmppConfig, XmppTransport
from tests.servers.xmpp import CuttableProxy, Human, Prosody, Received

NET = "test"
NICK = "releasebot"
WAIT = 5.0


async def nothing(message: Message) -> None:
    """Commands are not what these tests are about."""


@pytest.fixture
async def start_bot() -> AsyncIterator[Callable[..., Awaitable[XmppTransport]]]:
    """Factory: ``await start_bot(server, rooms=...)`` is a started XmppTransport."""
    transports: list[XmppTransport] = []

    async def start(server: Prosody, rooms: tuple[str, ...] = (), **overrides: Any) -> XmppTransport:
        settings: dict[str, Any] = dict(name=NET, jid=server.jid("bot"), password="botpw", host="127.0.0.1",
                                        port=server.port, tls="plaintext", rooms=rooms, nick=NICK,
                                        reconnect_min=0.1, reconnect_max=0.5)
        settings.update(overrides)
        transport = XmppTransport(XmppConfig(**settings))
        transports.append(transport)
        await transport.start(nothing)
        return transport

    yield start
    for transport in transports:
        await transport.close()


def from_bot(server: Prosody) -> Callable[[Received], bool]:
    return lambda m: m.type == "chat" and m.sender.startswith(server.jid("bot") + "/")


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- confirmed delivery ------------------------------------------------------------

@pytest.fixture(params=["acks", "ping"])
def confirming_server(request: pytest.FixtureRequest) -> Prosody:
    """A Prosody confirming by XEP-0198 acks, or one without stream management."""
    server: Prosody = request.getfixturevalue("prosody" if request.param == "acks" else "prosody_without_sm")
    return server


@pytest.mark.servers
async def test_a_receipt_resolves_once_the_server_confirmed_and_the_human_has_the_message(
        confirming_server: Prosody, start_bot) -> None:  # type: ignore[no-untyped-def]
    server = confirming_server
    alice = Human(server, "alice")
    try:
        ops = server.room("ops")
        bot = await start_bot(server, rooms=(ops,), max_line_chars=100)
        assert bot.ready
        assert bot._client.plugin["xep_0198"].enabled_out is server.smacks
        await alice.connect()
        await alice.join(ops)
        lines = [f"line {i} " + "x" * 80 for i in range(3)]         # three stanzas, one receipt
        receipt = await bot.send(Identity("xmpp", NET, server.jid("alice")), "\n".join(lines))
        in_room = await bot.send(Room("xmpp", NET, ops), "to the room")
        assert await asyncio.wait_for(receipt, WAIT) is None
        assert await asyncio.wait_for(in_room, WAIT) is None
        assert [(await alice.expect(from_bot(server))).body for _ in lines] == lines
        assert (await alice.expect(lambda m: m.type == "groupchat")).body == "to the room"
        assert bot.undelivered == 0
    finally:
        await alice.close()


@pytest.mark.servers
async def test_bounces_fail_the_receipt_as_undeliverable_with_the_servers_reason(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    alice: Human = await xmpp_human("alice")
    elsewhere = prosody.room("elsewhere")
    await alice.join(elsewhere)                                    # a room that exists, without the bot
    bot = await start_bot(prosody, rooms=(prosody.room("ops"),))

    not_in = await bot.send(Room("xmpp", NET, elsewhere), "hello?")
    with pytest.raises(Undeliverable, match=f"xmpp test: {elsewhere} refused the message: not-acceptable"):
        await asyncio.wait_for(not_in, WAIT)
    missing = await bot.send(Room("xmpp", NET, prosody.room("nowhere")), "hello?")
    with pytest.raises(Undeliverable, match="nowhere@conference.localhost refused the message: item-not-found"):
        await asyncio.wait_for(missing, WAIT)
    ghost = await bot.send(Person("xmpp", NET, "ghost", ("ghost@localhost",)), "hello?")
    with pytest.raises(Undeliverable, match="ghost@localhost refused the message: service-unavailable"):
        await asyncio.wait_for(ghost, WAIT)
    remote = await bot.send(Person("xmpp", NET, "remote", ("someone@elsewhere.example",)), "hello?")
    with pytest.raises(Undeliverable, match=r"refused the message: not-allowed \(Communication with remote "
                                            r"domains is not enabled\)"):
        await asyncio.wait_for(remote, WAIT)
    assert await alice.quiet(0.2) == []
    fine = await bot.send(Identity("xmpp", NET, prosody.jid("alice")), "still working")
    assert await asyncio.wait_for(fine, WAIT) is None


# --- persons --------------------------------------------------------------------------

@pytest.mark.servers
async def test_a_person_is_reached_at_their_jid_never_at_a_nick_someone_else_holds(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    hidden = prosody.room("hidden")
    mallory: Human = await xmpp_human("mallory")
    await mallory.join(hidden, nick="alice")                       # mallory owns a room hiding real JIDs,
    bot = await start_bot(prosody, rooms=(hidden,))                # as "alice", with the bot in it
    assert bot.trust.occupant(hidden, "alice").account is None     # the room does not say who "alice" is

    alice_person = Person("xmpp", NET, "alice", (prosody.jid("alice"),))
    offline = await bot.send(alice_person, "stored for alice")     # alice is not connected: stored offline
    assert await asyncio.wait_for(offline, WAIT) is None
    alice: Human = await xmpp_human("alice")
    stored = await alice.expect(from_bot(prosody))
    assert (stored.body, stored.delayed) == ("stored for alice", True)

    live = await bot.send(alice_person, "#7 publish waiting for you")
    assert await asyncio.wait_for(live, WAIT) is None
    assert (await alice.expect(from_bot(prosody))).body == "#7 publish waiting for you"
    assert await mallory.quiet(0.3) == []                          # nothing to the nick, in or out of the room

    with pytest.raises(Undeliverable, match="^bob has no JID on test$"):
        await (await bot.send(Person("xmpp", NET, "bob"), "hello"))
    with pytest.raises(Undeliverable, match="is a room, not a person"):
        await (await bot.send(Person("xmpp", NET, "mallory", (hidden,)), "hello"))


# --- a server restarted mid-message ----------------------------------------------------

@pytest.mark.servers
async def test_a_server_restarted_before_confirming_gets_the_message_again_within_the_bound(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(prosody, max_line_chars=100)
    alice: Human = await xmpp_human("alice")
    swallowed: list[str] = []

    def lose_acks(stanza: Any) -> Any:        # the server's acks never reach the bot: the worst case
        if stanza.name == "a":
            swallowed.append(str(stanza))
            return None
        return stanza
    bot._client.add_filter("in", lose_acks)
    parts = [f"part {i} " + "x" * 80 for i in range(3)]
    receipt = await bot.send(Identity("xmpp", NET, prosody.jid("alice")), "\n".join(parts))
    settled: list[object] = []
    receipt.add_done_callback(settled.append)
    got = [(await alice.expect(from_bot(prosody))).body for _ in parts]     # the server has them all ...
    await wait_until(lambda: swallowed)         # (its ack may come after alice has them, on a slow machine)
    assert got == parts
    await asyncio.sleep(0.2)
    assert not receipt.done()                                        # ... but never said so

    prosody.kill()
    await wait_until(lambda: not bot.ready)
    queued = await bot.send(Identity("xmpp", NET, prosody.jid("alice")), "queued while down")
    bot._client.del_filter("in", lose_acks)
    prosody.start()
    assert await asyncio.wait_for(receipt, WAIT) is None             # confirmed by the new session
    assert await asyncio.wait_for(queued, WAIT) is None
    assert bot.connections == 2

    again = Human(prosody, "alice")                                  # the copies were stored offline
    await again.connect()
    try:
        later = [m.body for m in await again.quiet(0.5) if from_bot(prosody)(m)]
    finally:
        await again.close()
    everything = got + later
    # Each part: at most 1 + 1 (one stream lost while it was unconfirmed); here exactly that.
    assert {part: everything.count(part) for part in parts} == {part: 2 for part in parts}
    assert everything.count("queued while down") == 1                # queued while down: exactly once
    assert len(settled) == 1


@pytest.mark.servers
async def test_a_resumed_stream_settles_the_receipt_from_what_the_server_says_it_had_without_repeats(
        prosody: Prosody, start_bot, xmpp_human) -> None:  # type: ignore[no-untyped-def]
    proxy = CuttableProxy(prosody.port)
    await proxy.start()
    try:
        bot = await start_bot(prosody, port=proxy.port, max_line_chars=100)
        alice: Human = await xmpp_human("alice")
        swallowed: list[str] = []

        def lose_acks(stanza: Any) -> Any:
            if stanza.name == "a":
                swallowed.append(str(stanza))
                return None
            return stanza
        bot._client.add_filter("in", lose_acks)
        parts = [f"part {i} " + "x" * 80 for i in range(3)]
        receipt = await bot.send(Identity("xmpp", NET, prosody.jid("alice")), "\n".join(parts))
        assert [(await alice.expect(from_bot(prosody))).body for _ in parts] == parts
        await asyncio.sleep(0.2)
        assert swallowed and not receipt.done()

        proxy.cut()                                    # the network goes; the server keeps the session
        await wait_until(lambda: not bot.ready)
        bot._client.del_filter("in", lose_acks)
        proxy.up = True
        assert await asyncio.wait_for(receipt, WAIT) is None      # the resume's h counts all three
        assert bot.connections == 1                    # resumed, not a new session
        assert await alice.quiet(0.3) == []            # and nothing was sent twice
    finally:
        await proxy.close()


@pytest.mark.servers
async def test_close_fails_open_receipts_as_not_delivered_and_ready_follows_the_stream(
        prosody: Prosody, start_bot) -> None:  # type: ignore[no-untyped-def]
    bot = await start_bot(prosody)
    assert bot.ready
    prosody.kill()
    await wait_until(lambda: not bot.ready)
    waiting = await bot.send(Identity("xmpp", NET, prosody.jid("alice")), "never confirmed")
    await bot.close(flush_timeout=0.1)
    with pytest.raises(NotDelivered, match="xmpp test: closed before the server confirmed it"):
        await waiting
    assert not bot.ready
