"""IRC receipts: what ``IrcTransport.send`` returns, and ``Person`` targets.

First without a server or a sleep (a fake clock and a fake server that
answers marker PINGs, echoes, and refuses lines to some targets, as
``test_irc_delivery`` drives the writer): when a receipt resolves or fails,
refusals counted against the right lines, the cap, reconnects, and how a
person's nick is chosen.  Then against real servers on 127.0.0.1: ngircd
(no echo-message: marker PINGs confirm) and InspIRCd + Anope (services
accounts, echo-message)."""
from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from bot.chat import NotDelivered, Outgoing, Person, Room, Undeliverable
from bot.outqueue import overflow_note
from bot.transports.irc import IrcTransport
from bot.transports.irc.delivery import Delivery, Dest, Writer
from bot.transports.irc.receipts import Receipt
from bot.transports.irc.roster import CHANGED, OK, UNKNOWN, Roster
from tests.servers.irc import (BOT, NET, BotFactory, Human, InspircdAnope, Ngircd, bot_lines, fast, irc_config,
                               wait_for)
from tests.serverkit.irc import TcpProxy
from tests.test_irc_delivery import RTT, Clock, FakeLink, lines, run

ROOM = Dest("#ops", "#ops")
NOSUCH = Dest("#nosuch", "#nosuch")
ALICE = Dest("alice", "alice", True, account="alice")


class Server(FakeLink):
    """FakeLink that also refuses lines (to a target in ``refuse``, or with a
    text in ``refuse_texts``): the numeric comes where the server would write
    it, before the answer to any later line; a refused line is not echoed."""

    def __init__(self, clock: Clock, delivery: Delivery, *, echo: bool = False, refuse: set[str] = set()) -> None:
        super().__init__(clock, delivery, echo=echo)
        self.refuse = set(refuse)
        self.refuse_texts: set[str] = set()

    def write_lines(self, written: list[str]) -> None:
        for line in written:
            self.wire.append((self.clock(), line))
            if line.startswith(("PRIVMSG", "NOTICE")):
                _, target, text = line.split(" ", 2)
                if target in self.refuse or text[1:] in self.refuse_texts:
                    self.due.append((self.clock() + RTT, f"404 {target}"))
                elif self.echoing:
                    self.due.append((self.clock() + RTT, line))
            elif line.startswith("PING :"):
                self.due.append((self.clock() + RTT, line))

    def answer(self) -> None:
        now = self.clock()
        for when, line in [d for d in self.due if d[0] <= now]:
            self.due.remove((when, line))
            if line.startswith("404 "):
                self.delivery.refused(line[4:], "Cannot send to channel", str.lower)
            elif line.startswith("PING :"):
                if self.marker and line[6:] == self.marker[0]:
                    self.delivery.confirm(self.marker[1])
                    self.marker = None
            else:
                command, target, text = line.split(" ", 2)
                self.delivery.echoed(command, target, text[1:], str.lower)


def setup(rate: float = 1000.0, burst: int = 1000, *, echo: bool = False, refuse: set[str] = set(),
          max_queued: int = 60) -> tuple[Clock, Delivery, Server, Writer]:
    clock = Clock()
    delivery = Delivery("testnet", max_queued, clock)
    server = Server(clock, delivery, echo=echo, refuse=refuse)
    return clock, delivery, server, Writer(delivery, server, rate, burst, clock)


def put(delivery: Delivery, dest: Dest, texts: list[str], person: str | None = None) -> Receipt:
    receipt = Receipt(person)
    delivery.put(dest, "PRIVMSG", texts, receipt)
    return receipt


def error(receipt: Receipt) -> BaseException | None:
    assert receipt.done, "the receipt is still open"
    return receipt.future.exception()


# -- when a receipt settles (fake server) -------------------------------------------------------------

@pytest.mark.parametrize("echo", [False, True])
async def test_a_receipt_resolves_once_the_server_confirmed_every_line_of_its_message(echo: bool) -> None:
    clock, delivery, server, writer = setup(rate=2.0, burst=3, echo=echo)
    first = put(delivery, ROOM, lines(5, "a"))
    second = put(delivery, ROOM, ["b"])
    writer.step()                                     # the burst is written: nothing confirmed yet
    assert len(server.messages()) == 3 and not first.done and not second.done
    run(clock, server, writer, 1.0)
    assert not first.done                             # a part of it is still queued or unconfirmed
    run(clock, server, writer, 5.0)
    assert error(first) is None and error(second) is None
    assert [text for _, text in server.messages()] == [*lines(5, "a"), "b"]


async def test_a_line_cut_again_when_written_counts_both_parts() -> None:
    clock, delivery, server, writer = setup()
    receipt = put(delivery, ROOM, ["x" * 30])
    server.budget = lambda command, target: 20        # type: ignore[method-assign]  # our prefix grew
    writer.step()
    assert [text for _, text in server.messages()] == ["x" * 20, "x" * 10]
    assert receipt.open == 2
    run(clock, server, writer, 0.1)
    assert error(receipt) is None


async def test_a_refused_line_fails_its_message_with_the_servers_text_and_the_rest_of_it_is_not_sent() -> None:
    # without echo-message: one marker confirms the lines to both targets; the refusal that
    # came before its answer is counted against the line to #nosuch, not taken as confirmed
    clock, delivery, server, writer = setup(rate=1.0, burst=3, refuse={"#nosuch"})
    refused = put(delivery, NOSUCH, lines(6, "n"))
    fine = put(delivery, ROOM, ["for the room"])
    run(clock, server, writer, 30)
    failure = error(refused)
    assert isinstance(failure, Undeliverable)
    assert str(failure) == "testnet: the server refused the message to #nosuch: Cannot send to channel"
    assert error(fine) is None
    assert len(server.messages("#nosuch")) < 6 and delivery.pending() == 0   # the rest was skipped


@pytest.mark.parametrize("echo", [False, True])
async def test_when_a_target_refuses_only_some_lines_no_refused_message_is_ever_reported_delivered(
        echo: bool) -> None:
    # Three messages to #x are written in one burst; the server refuses the second only (a
    # mode changed meanwhile).  With echo-message the echoes say which: only that one fails.
    # Without it nothing says which: every message among them fails, naming the doubt.
    clock, delivery, server, writer = setup(rate=1.0, burst=3, echo=echo)      # no token spare for a marker
    x = Dest("#x", "#x")
    receipts = [put(delivery, x, [f"m{i}"]) for i in range(3)]
    server.refuse_texts = {"m1"}
    run(clock, server, writer, 5)
    failures = [error(r) for r in receipts]
    doubt = "" if echo else " (the server refused 1 of 3 lines to #x without saying which)"
    assert isinstance(failures[1], Undeliverable) and str(failures[1]).endswith("Cannot send to channel" + doubt)
    if echo:
        assert failures[0] is None and failures[2] is None
    else:
        assert all(isinstance(f, Undeliverable) for f in failures)


async def test_a_person_whose_nick_changed_hands_fails_not_delivered_naming_the_user() -> None:
    clock, delivery, server, writer = setup(echo=True)
    server.verdicts["alice"] = CHANGED
    receipt = put(delivery, ALICE, ["your release is out"], person="alice")
    run(clock, server, writer, 1)
    failure = error(receipt)
    assert isinstance(failure, NotDelivered)
    assert str(failure) == "alice is not online on testnet under a verified nick (the nick is someone else's now)"
    assert server.messages() == []


async def test_a_message_is_queued_whole_or_not_at_all_and_one_longer_than_the_cap_fails_once_its_part_went(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    clock, delivery, server, writer = setup(rate=1.0, burst=1, max_queued=10)
    waiting = put(delivery, ROOM, lines(8, "w"))
    crowded = put(delivery, ROOM, lines(3, "c"))      # 8 + 3 > 10: not queued at all
    failure = error(crowded)
    assert isinstance(failure, NotDelivered)
    assert str(failure) == "testnet: 8 line(s) wait for #ops already (max_queued_lines 10); try again later"
    assert delivery.pending() == 8
    fits = put(delivery, ROOM, lines(1, "f"))
    run(clock, server, writer, 30)
    assert error(waiting) is None and error(fits) is None
    assert [text for _, text in server.messages()] == [*lines(8, "w"), "f0"]

    long = put(delivery, ROOM, lines(25, "l"))        # longer than the cap on its own
    assert not long.done
    run(clock, server, writer, 30)
    assert [text for _, text in server.messages()][9:] == [*lines(9, "l"), overflow_note(16)]
    failure = error(long)
    assert isinstance(failure, Undeliverable)
    assert "a message of 25 lines for #ops is longer than max_queued_lines (10)" in str(failure)


async def test_lines_unconfirmed_when_the_connection_died_resolve_their_receipt_on_the_next_one() -> None:
    # two messages to #ops in one burst; the old server refused one of them (which, it did not
    # say) and died before its confirmation: both go again, and the new server takes both
    clock, delivery, server, writer = setup(rate=1.0, burst=5)
    server.refuse_texts = {"b0"}
    first, second = put(delivery, ROOM, lines(2, "a")), put(delivery, ROOM, lines(1, "b"))
    writer.step()
    server.due = [d for d in server.due if not d[1].startswith("PING")]   # the answer never comes ...
    clock.now += RTT
    server.answer()                                   # ... but the refusal did
    server.is_alive = False
    delivery.requeue()                                # the refusal goes with its connection
    assert not first.done and not second.done
    server2 = Server(clock, delivery)
    writer2 = Writer(delivery, server2, 1.0, 5, clock)
    run(clock, server2, writer2, 5)
    assert [text for _, text in server2.messages()] == ["a0", "a1", "b0"]
    assert error(first) is None and error(second) is None


async def test_close_of_the_delivery_fails_open_receipts_and_a_failure_nobody_awaits_is_not_noise(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "asyncio")
    clock, delivery, server, writer = setup()
    receipt = put(delivery, ROOM, ["never confirmed"])
    writer.step()
    delivery.fail_open(NotDelivered("testnet: closed"))
    assert isinstance(error(receipt), NotDelivered)
    del receipt
    transport = IrcTransport(irc_config(6667))
    await transport.send(Person("irc", NET, "alice", accounts=("alice",)), "nobody awaits this")   # failed
    lonely = Receipt()
    lonely.fail(NotDelivered("nobody awaits this either"))
    del lonely
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# -- choosing a person's nick (the roster) ----------------------------------------------------------------

def tracked_roster() -> Roster:
    view = Roster(Clock())
    view.caps = {"account-notify", "extended-join"}
    view.whox = True
    view.joined_channel("#ops")
    return view


def test_a_person_is_reached_only_at_a_nick_logged_into_their_account_chosen_deterministically() -> None:
    view = tracked_roster()
    view.joined_by("alice", "al@h", "#ops", None, known=True)                 # the nick, not logged in
    assert view.holder(("alice",)) is None
    view.joined_by("Zed", "z@h", "#ops", "Alice", known=True)                 # alice's account, another nick
    view.joined_by("al_work", "w@h", "#ops", "alice", known=True)
    assert view.holder(("alice",)) == ("al_work", "alice", None)              # by casefolded nick
    assert view.holder(("ALICE",), hint="Zed") == ("Zed", "Alice", None)      # where last seen, first
    view.joined_by("other", "o@h", "#ops", "alice2", known=True)
    assert view.holder(("alice2", "alice")) == ("other", "alice2", None)      # in the order of the accounts
    assert view.holder(("alice2", "alice"), hint="al_work") == ("al_work", "alice", None)   # the hint first
    view.account_changed("alice", "alice")                                   # the nick named like it logs in
    assert view.holder(("alice",)) == ("alice", "alice", None)
    view.caps = {"extended-join"}                                            # logins not kept current
    assert view.holder(("alice",)) is None


def test_hostmasks_count_only_where_given_and_only_after_accounts() -> None:
    view = tracked_roster()
    view.joined_by("dave", "~dave@127.0.0.1", "#ops", None, known=True)
    assert view.holder(("dave",)) is None
    assert view.holder(("dave",), ("dave!~dave@127.0.0.*",)) == ("dave", None, "~dave@127.0.0.1")
    assert view.holder((), ("dave!*@elsewhere",)) is None
    view.joined_by("dave2", "d@h", "#ops", "dave", known=True)
    assert view.holder(("dave",), ("dave!*@*",)) == ("dave2", "dave", None)   # an account first


def test_several_accounts_any_of_them_verifies_the_nick() -> None:
    view = tracked_roster()
    view.joined_by("bob", "b@h", "#ops", "bob-work", known=True)
    assert view.verify("bob", "bob", None, more_accounts=("Bob-Work",)) == OK
    assert view.verify("bob", "bob", None) == CHANGED
    assert view.verify("carol", "carol", None) == UNKNOWN                     # not watched: the server is asked


async def test_a_person_is_not_sent_to_while_disconnected_and_needs_an_identity() -> None:
    transport = IrcTransport(irc_config(6667))
    offline = await transport.send(Person("irc", NET, "alice", accounts=("alice",)), "hi")
    assert isinstance(offline.exception(), NotDelivered)
    assert str(offline.exception()) == "alice is not online on testnet under a verified nick (not connected)"
    nobody = await transport.send(Person("irc", NET, "carol"), "hi")
    assert isinstance(nobody.exception(), Undeliverable)
    with pytest.raises(Undeliverable):
        await transport.send(Person("xmpp", "jabber", "alice", accounts=("alice@example.org",)), "hi")
    assert transport.pending() == 0 and not transport.ready


# -- real servers: ngircd (marker PINGs confirm) ------------------------------------------------------------

servers = pytest.mark.servers


@servers
async def test_a_receipt_resolves_once_the_server_relayed_the_line_and_not_while_it_cannot(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await irc_bots(fast(proxy.port, ping_interval=0.5, ping_timeout=0.5))
        human = await irc_clients(ngircd.port, "grace")
        await human.join("#ops")
        assert bot.ready
        ops = Room("irc", NET, "#ops")
        receipt = await bot.send(ops, Outgoing("hello\nworld", subject="chat has no subject"))   # its text
        await asyncio.wait_for(receipt, 5)
        assert [m.text for m in await human.messages_from(BOT, 2, timeout=1)] == ["hello", "world"]

        proxy.freeze()                                   # nothing reaches the server, nothing comes back
        receipt = await bot.send(ops, "into the void")
        await asyncio.sleep(0.4)
        assert not receipt.done() and bot_lines(human, BOT) == ["hello", "world"]
        await asyncio.wait_for(receipt, 10)              # keepalive noticed; sent again on a new connection
        assert bot.disconnects == 1
        [line] = await human.messages_from(bot.nick, 1, timeout=1)
        assert line.text == "into the void"
    finally:
        await proxy.close()


@servers
async def test_a_message_to_a_channel_the_server_refuses_fails_undeliverable_with_the_servers_text(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot = await irc_bots(fast(ngircd.port))
    human = await irc_clients(ngircd.port, "owner")
    await human.join("#ops")
    await human.join("#closed")
    human.send("MODE #closed +n")                        # no messages from outside
    await human.expect(lambda m: m.command == "MODE" and m.params[:1] == ["#closed"])
    nosuch, before, closed, after = [
        await bot.send(Room("irc", NET, name), f"to {name}") for name in ("#nosuch", "#ops", "#closed", "#ops")]
    with pytest.raises(Undeliverable) as exc:
        await asyncio.wait_for(nosuch, 5)
    assert str(exc.value) == "testnet: the server refused the message to #nosuch: No such nick or channel name"
    with pytest.raises(Undeliverable) as exc:
        await asyncio.wait_for(closed, 5)
    assert str(exc.value) == "testnet: the server refused the message to #closed: Cannot send to channel"
    await asyncio.wait_for(asyncio.gather(before, after), 5)     # the same markers confirmed these
    assert [m.text for m in await human.messages_from(BOT, 2, timeout=1)] == ["to #ops", "to #ops"]
    assert "echo-message" not in bot._session.caps   # type: ignore[union-attr]


@servers
async def test_a_403_while_joining_is_the_joins_and_fails_no_message(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    # 403 answers a JOIN or a message (InspIRCd's to #nosuch: the Person test below); ngircd answers a
    # JOIN of a name too long with it, and a message to that name with 401
    too_long = "#" + "x" * 60
    bot = await irc_bots(fast(ngircd.port, channels=("#ops", too_long)))     # ready: the JOIN was refused
    human = await irc_clients(ngircd.port, "pat")
    await human.join("#ops")
    refused, fine = await bot.send(Room("irc", NET, too_long), "x"), await bot.send(Room("irc", NET, "#ops"), "ok")
    with pytest.raises(Undeliverable, match="No such nick or channel name"):
        await asyncio.wait_for(refused, 5)
    await asyncio.wait_for(fine, 5)


@servers
async def test_after_a_server_restart_mid_message_the_receipt_resolves_once_and_each_line_arrives(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await irc_bots(irc_config(proxy.port, pacing_rate=20.0, pacing_burst=5))
        human = await irc_clients(ngircd.port, "quinn")
        await human.join("#ops")
        sent = [f"line {i:02d}" for i in range(30)]
        receipt = await bot.send(Room("irc", NET, "#ops"), "\n".join(sent))
        settled: list[str] = []
        receipt.add_done_callback(lambda f: settled.append("error" if f.exception() else "ok"))
        await wait_for(lambda: len(bot_lines(human, BOT)) >= 10, 5)
        unconfirmed = bot.unconfirmed()                  # no await since: what a crash may repeat
        proxy.accepting = False
        ngircd.kill()
        await asyncio.wait_for(human.closed.wait(), 5)
        before = bot_lines(human, BOT)
        assert not receipt.done() and 10 <= len(before) < len(sent)

        ngircd.start()                                   # same port, empty state
        human = await irc_clients(ngircd.port, "quinn")
        await human.join("#ops")
        proxy.accepting = True
        await asyncio.wait_for(receipt, 15)
        await human.expect(lambda m: m.command == "PRIVMSG" and m.text == sent[-1], 2)
        after = bot_lines(human, BOT)
        seen = before + after
        assert sorted(set(seen)) == sent                 # every line arrived
        repeats = len(seen) - len(sent)
        assert 0 <= repeats <= unconfirmed               # twice at most what was unconfirmed at the crash
        assert after == sent[len(sent) - len(after):]    # the new server got them in order
        await asyncio.sleep(0.2)
        assert settled == ["ok"]                         # resolved, once
    finally:
        await proxy.close()


@servers
async def test_close_fails_the_receipts_still_open_and_ready_follows_the_connection(
        ngircd: Ngircd, irc_bots: BotFactory) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await irc_bots(fast(proxy.port), ready=False)
        assert not bot.ready
        await bot.wait_ready(5)
        assert bot.ready
        proxy.freeze()
        receipt = await bot.send(Room("irc", NET, "#ops"), "never confirmed")
        await bot.close(flush_timeout=0.2)
        assert not bot.ready
        with pytest.raises(NotDelivered):
            await receipt
        with pytest.raises(NotDelivered):
            await bot.send(Room("irc", NET, "#ops"), "too late")
    finally:
        await proxy.close()


@servers
async def test_a_person_known_by_hostmask_only_is_reached_where_it_matches_and_nowhere_else(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot = await irc_bots(fast(ngircd.port))
    dave = await irc_clients(ngircd.port, "dave")
    await dave.join("#ops")
    await wait_for(lambda: "dave" in bot._session.roster.people)      # type: ignore[union-attr]
    person = Person("irc", NET, "dave", hostmasks=("dave!~dave@127.0.0.1",))
    await asyncio.wait_for(await bot.send(person, "by hostmask"), 5)
    [line] = await dave.messages_from(BOT, 1, timeout=1)
    assert (line.params[0], line.text) == ("dave", "by hostmask")
    stranger = Person("irc", NET, "erin", accounts=("erin",), hostmasks=("erin!*@*",))
    with pytest.raises(NotDelivered, match="erin is not online on testnet under a verified nick"):
        await asyncio.wait_for(await bot.send(stranger, "nobody"), 5)    # ngircd: no WHOX, no accounts


# -- real servers: InspIRCd + Anope (services accounts, echo-message) ------------------------------------------

ALICE_ACCOUNT = ("alice", "alicepw-1")


@pytest.fixture
def insp(inspircd_anope: InspircdAnope) -> InspircdAnope:
    inspircd_anope.register(ALICE_ACCOUNT)
    return inspircd_anope


def alice(**kwargs: Any) -> Person:
    return Person("irc", NET, "alice", accounts=("alice",), **kwargs)


@servers
async def test_a_person_online_in_a_shared_channel_gets_the_private_line_at_the_nick_logged_into_their_account(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any) -> None:
    # the real alice is "alice_w"; an impostor, not logged in, holds "alice" in the same channel
    bot, real, impostor = await asyncio.gather(
        irc_bots(irc_config(insp.port, nick="rcptbot", channels=("#rcpt",))),
        irc_clients(insp.helper_port, "alice_w", sasl=ALICE_ACCOUNT), irc_clients(insp.helper_port, "alice"))
    await asyncio.gather(real.join("#rcpt"), impostor.join("#rcpt"))
    roster = bot._session.roster                         # type: ignore[union-attr]
    await wait_for(lambda: {"alice_w", "alice"} <= set(roster.people))
    receipt = await bot.send(alice(handle="alice"), "your release is out")   # even where last "seen"
    await asyncio.wait_for(receipt, 5)
    [line] = await real.messages_from("rcptbot", 1, timeout=1)
    assert (line.params[0], line.text) == ("alice_w", "your release is out")
    assert await impostor.quiet("rcptbot", 0.2) == []

    with pytest.raises(Undeliverable) as exc:              # and with echo-message, a refusal (403)
        await asyncio.wait_for(await bot.send(Room("irc", NET, "#nosuch"), "hi"), 5)
    assert str(exc.value) == "testnet: the server refused the message to #nosuch: No such channel"


@servers
async def test_a_nick_held_by_an_impostor_not_logged_in_gets_nothing_and_the_message_is_not_delivered(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot, shared, elsewhere = await asyncio.gather(
        irc_bots(irc_config(insp.port, nick="rcptbot2", channels=("#rcpt2",))),
        irc_clients(insp.helper_port, "alice"), irc_clients(insp.helper_port, "alice2"))
    await shared.join("#rcpt2")                          # in a channel with the bot: the roster knows
    await wait_for(lambda: "alice" in bot._session.roster.people)   # type: ignore[union-attr]
    with pytest.raises(NotDelivered) as exc:
        await asyncio.wait_for(await bot.send(alice(), "secret"), 5)
    assert str(exc.value).startswith("alice is not online on testnet under a verified nick")
    # one sharing no channel with the bot: the server is asked (WHOX) and does not vouch
    with pytest.raises(NotDelivered) as exc:
        await asyncio.wait_for(await bot.send(alice(handle="alice2"), "secret"), 5)
    assert str(exc.value).startswith("alice is not online on testnet under a verified nick")
    assert await shared.quiet("rcptbot2", 0.2) == [] and await elsewhere.quiet("rcptbot2", 0) == []


@servers
async def test_a_person_sharing_no_channel_is_reached_once_the_server_vouches_for_the_nick(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot, real = await asyncio.gather(irc_bots(irc_config(insp.port, nick="rcptbot3", channels=())),
                                     irc_clients(insp.helper_port, "alice", sasl=ALICE_ACCOUNT))
    await asyncio.wait_for(await bot.send(alice(), "found you"), 5)   # WHOX alice: logged in as alice
    [line] = await real.messages_from("rcptbot3", 1, timeout=1)
    assert (line.params[0], line.text) == ("alice", "found you")
