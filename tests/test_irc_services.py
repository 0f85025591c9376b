"""The IRC front-end against a real InspIRCd 3 + Anope 2 on 127.0.0.1:
NickServ accounts, SASL (also late, when services come back), IRCv3 account
tags and account tracking, echo-message, and InspIRCd's DEFAULT connect class,
which enforces flood limits (fakelag, RecvQ).  One pair serves the session;
tests that stop servers get their own."""
from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from bot.access import IrcIds, User
from bot.chat import Identity, Message, Room
from bot.transports.irc import DEFAULT_BURST, DEFAULT_CAPS, DEFAULT_MAX_QUEUED, DEFAULT_RATE, IrcConfig, IrcTransport
from tests.servers import free_port
from tests.servers.irc import BOT, NET, BotFactory, Human, InspircdAnope, irc_config, wait_for
from tests.serverkit.irc import NoLateSaslProxy

pytestmark = pytest.mark.servers
BOT_ACCOUNT = ("releasebot", "botpw-1")
BOSS = ("boss", "bosspw-1")          # the admin's services account
ALICE = ("alice", "alicepw-1")
ADMINS = {"*": frozenset({"admins"})}


@pytest.fixture(scope="session")
def insp(inspircd_anope: InspircdAnope) -> InspircdAnope:
    inspircd_anope.register(BOT_ACCOUNT, BOSS, ALICE)
    return inspircd_anope


async def take_nick(human: Human, nick: str, timeout: float = 5.0) -> None:
    """``human`` changes nick to ``nick`` as soon as it is free (its holder may still be leaving)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        human.send(f"NICK {nick}")
        reply = await human.expect(lambda m: m.command in ("NICK", "433") and nick in m.params, timeout)
        if reply.command == "NICK":
            human.nick = nick
            return
        assert asyncio.get_running_loop().time() < deadline, f"{nick} stayed taken"
        await asyncio.sleep(0.05)


# -- identities, SASL and accounts (InspIRCd + Anope) --------------------------------------------------

async def test_bot_logs_in_with_sasl_and_its_lines_carry_its_account(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)                          # even the library's raw-line logging
    bot, human = await asyncio.gather(
        irc_bots(irc_config(insp.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1])),
        irc_clients(insp.helper_port, "judy", caps=("account-tag", "message-tags")))
    assert bot.account == BOT_ACCOUNT[0]
    secret = base64.b64encode(f"\0{BOT_ACCOUNT[0]}\0{BOT_ACCOUNT[1]}".encode()).decode()
    assert any("AUTHENTICATE PLAIN" in r.getMessage() for r in caplog.records)
    assert not any(secret in r.getMessage() or BOT_ACCOUNT[1] in r.getMessage() for r in caplog.records)
    await human.join("#ops")
    reply = await human.ask("#ops", "!help", BOT)
    assert reply.tags.get("account") == BOT_ACCOUNT[0]


async def test_a_wrong_sasl_password_is_logged_and_the_bot_still_serves(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    bot, human = await asyncio.gather(
        irc_bots(irc_config(insp.port, nick="releasebot2", sasl_account=BOT_ACCOUNT[0], sasl_password="wrong")),
        irc_clients(insp.helper_port, "karl"))
    assert bot.account is None
    assert any("SASL login as releasebot failed" in r.getMessage() for r in caplog.records)
    assert not any("wrong" in r.getMessage() for r in caplog.records)      # never the password
    await human.join("#ops")
    assert (await human.ask("#ops", "!help", "releasebot2")).text.startswith("karl: commands:")


async def test_whoami_shows_the_services_account_of_a_sasl_user(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any) -> None:
    _, human = await asyncio.gather(
        irc_bots(irc_config(insp.port), users=[User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)]),
        irc_clients(insp.helper_port, "bossman", sasl=BOSS))                # any nick: the account counts
    await human.join("#ops")
    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text == "bossman: bossman on testnet is boss, verified by services account; roles: *: admins"


async def test_an_impostor_with_the_admins_nick_is_refused_and_the_refusal_logged(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bot.commands")
    _, boss, impostor = await asyncio.gather(
        irc_bots(irc_config(insp.port), users=[User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)]),
        irc_clients(insp.helper_port, "boss", sasl=BOSS), irc_clients(insp.helper_port, "mallory"))
    await boss.join("#ops")
    assert (await boss.ask("#ops", "!ps", BOT)).text == "boss: no running, waiting or failed instances"
    await boss.close()

    await take_nick(impostor, "boss")                                       # same nick, not logged in
    await impostor.join("#ops")
    reply = await impostor.ask("#ops", "!ps", BOT)
    assert reply.text.startswith("boss: not authorised: ps needs a verified, known user "
                                 "(boss on testnet: not identified (not verified))")
    reply = await impostor.ask(BOT, "cancel 1", BOT)
    assert reply.text.startswith("not authorised: cancel needs a verified, known user")
    refusals = [r.getMessage() for r in caplog.records if r.name == "bot.commands"]
    assert any("refused 'ps' from irc:testnet:boss" in m for m in refusals)
    assert any("refused 'cancel 1' from irc:testnet:boss" in m for m in refusals)


async def test_a_command_to_the_channels_ops_only_is_answered_to_its_ops_only(
        tmp_path: Path, irc_bots: BotFactory, irc_clients: Any) -> None:
    # ngircd has no STATUSMSG; InspIRCd has (ISUPPORT STATUSMSG).  Its own one,
    # without services, where a channel's creator is an op.
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, helper_port, link_port = sorted(ports)
    server = InspircdAnope(tmp_path / "insp", port, helper_port, link_port, channel_modes="not").start(services=False)
    try:
        oscar, peggy = await asyncio.gather(irc_clients(server.helper_port, "oscar"),
                                            irc_clients(server.helper_port, "peggy"))     # peggy: not an op
        await oscar.join("#opsonly")                            # first in: an op
        await irc_bots(irc_config(server.port, channels=("#opsonly",)))
        oscar.send(f"MODE #opsonly +o {BOT}")                   # only ops get "@#opsonly" lines
        await oscar.expect(lambda m: m.command == "MODE" and BOT in m.params)
        await peggy.join("#opsonly")

        reply = await oscar.ask("@#opsonly", "!help whoami", BOT)
        assert (reply.params[0], reply.text) == (
            "@#opsonly", "oscar: whoami - who the bot thinks you are, and how that was verified")
        assert await peggy.quiet(BOT, 0.5) == []                # the old answer went to all of #opsonly
        reply = await peggy.ask("#opsonly", "!help whoami", BOT)    # control: channel command, channel answer
        assert reply.params[0] == "#opsonly"
    finally:
        server.stop()


async def test_without_account_tag_accounts_come_from_extended_join_account_notify_and_whox(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any) -> None:
    early = await irc_clients(insp.helper_port, "early", sasl=ALICE)    # in the channel before the bot: WHOX
    await early.join("#track")
    caps = tuple(c for c in DEFAULT_CAPS if c != "account-tag")
    _, late, anon = await asyncio.gather(
        irc_bots(irc_config(insp.port, channels=("#track",), request_caps=caps),
                 users=[User("alice", irc={NET: IrcIds(("alice",))}),
                        User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)]),
        irc_clients(insp.helper_port, "late", sasl=BOSS),
        irc_clients(insp.helper_port, "boss"))                     # the admin's nick, not logged in
    assert (await early.ask("#track", "!whoami", BOT)).text.startswith(
        "early: early on testnet is alice, verified by services")

    await late.join("#track")                                      # joins after the bot: extended-join
    assert (await late.ask("#track", "!whoami", BOT)).text.startswith(
        "late: late on testnet is boss, verified by services")

    await anon.join("#track")
    assert (await anon.ask("#track", "!ps", BOT)).text.startswith("boss: not authorised")
    anon.say("NickServ", f"IDENTIFY {BOSS[1]}")                    # logs in now: account-notify
    await anon.expect(lambda m: m.command == "900")
    await asyncio.sleep(0.2)
    assert (await anon.ask("#track", "!whoami", BOT)).text.startswith(
        "boss: boss on testnet is boss, verified by services")
    anon.say("NickServ", "LOGOUT")                                 # and out again
    await anon.expect(lambda m: m.command == "901")
    await asyncio.sleep(0.2)
    assert (await anon.ask("#track", "!ps", BOT)).text.startswith("boss: not authorised")


async def test_after_a_server_restart_while_services_are_down_the_bot_logs_in_once_they_are_back(
        own_inspircd_anope: InspircdAnope, irc_bots: BotFactory, irc_clients: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    pair = own_inspircd_anope
    await asyncio.to_thread(pair.register, BOT_ACCOUNT)
    bot = await irc_bots(irc_config(pair.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1]),
                     sasl_recheck=0.5)
    assert bot.account == BOT_ACCOUNT[0]

    await asyncio.to_thread(pair.stop_services)       # anope saves its accounts and goes
    pair.kill_ircd()                                   # the ircd crashes ...
    await asyncio.to_thread(pair.start_ircd)           # ... and comes back, without services: no SASL
    human, _ = await asyncio.gather(irc_clients(pair.helper_port, "nina", caps=("account-tag", "message-tags")),
                                    wait_for(lambda: bot.connections == 2 and bot.connected, 15))
    await bot.wait_ready(10)
    assert bot.account is None
    assert any("offers no SASL PLAIN" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    await human.join("#ops")
    reply = await human.ask("#ops", "!help whoami", BOT)     # it still serves, logged out
    assert reply.text.startswith("nina: whoami - ") and "account" not in reply.tags

    await asyncio.to_thread(pair.start_services)       # InspIRCd 3 lists sasl again but announces nothing
    await wait_for(lambda: bot.account == BOT_ACCOUNT[0], 15)
    reply = await human.ask("#ops", "!help whoami", BOT)
    assert reply.tags.get("account") == BOT_ACCOUNT[0]        # the server vouches for the bot again
    assert (bot.connections, bot.disconnects) == (2, 1)       # logged in after registration, no reconnect


async def test_a_server_refusing_sasl_after_registration_gets_a_clean_reconnect_and_the_bot_logs_in(
        own_inspircd_anope: InspircdAnope, irc_bots: BotFactory, irc_clients: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    pair = own_inspircd_anope
    await asyncio.to_thread(pair.register, BOT_ACCOUNT)
    await asyncio.to_thread(pair.stop_services)
    proxy = await NoLateSaslProxy(pair.port).start()
    try:
        bot, human = await asyncio.gather(
            irc_bots(irc_config(proxy.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1]),
                     sasl_recheck=0.5),
            irc_clients(pair.helper_port, "olga"))
        assert bot.account is None
        await human.join("#ops")

        await asyncio.to_thread(pair.start_services)
        await wait_for(lambda: bot.account == BOT_ACCOUNT[0] and bot.connected, 20)
        assert proxy.refused == 1
        quit_line = await human.expect(lambda m: m.command == "QUIT" and m.nick == BOT)
        assert "reconnecting to log in" in quit_line.text
        assert (bot.connections, bot.disconnects) == (2, 0)         # a chosen reconnect, not a lost link
        assert any("reconnecting to log in while registering" in r.getMessage() for r in caplog.records)
        await bot.wait_ready(10)
        assert (await human.ask("#ops", "!help whoami", BOT)).text.startswith("olga: whoami - ")
    finally:
        await proxy.close()


async def test_the_bot_ignores_its_own_echoed_lines(
        insp: InspircdAnope, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "irc.client_aio")
    seen: list[Message] = []

    async def record(message: Message) -> None:
        seen.append(message)

    bot = IrcTransport(irc_config(insp.port, channels=("#echo",)))
    await bot.start(record)
    try:
        human, _ = await asyncio.gather(irc_clients(insp.helper_port, "lena"), bot.wait_ready(15))
        await human.join("#echo")
        for text in ("!ps", f"{BOT}: cancel 1"):
            await bot.send(Room("irc", NET, "#echo"), text)
        await bot.send(Identity("irc", NET, BOT), "whoami")         # even a private line to itself
        assert [m.text for m in await human.messages_from(BOT, 2)] == ["!ps", f"{BOT}: cancel 1"]
        for _ in range(100):
            if bot.pending() == 0:
                break
            await asyncio.sleep(0.05)
        assert bot.pending() == 0                                   # the echoes confirmed them
        echoed = [r.getMessage() for r in caplog.records if f":{BOT}!" in r.getMessage() and "PRIVMSG" in r.getMessage()]
        assert len(echoed) >= 3                                     # the server did send them back
        assert seen == []
        human.say("#echo", "!ps")                                   # control: a human is heard
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        assert [m.text for m in seen] == ["ps"]
    finally:
        await bot.close(flush_timeout=1)


async def test_the_default_connect_class_really_cuts_off_a_sender_that_does_not_pace(
        insp: InspircdAnope, irc_clients: Any) -> None:
    """The control for the next test: on this port an unpaced burst is fatal."""
    flooder = await irc_clients(insp.port, "flooder")
    await flooder.join("#flood-control")
    flooder.writer.write(b"".join(f"PRIVMSG #flood-control :{i:03d} {'x' * 60}\r\n".encode() for i in range(300)))
    error = await flooder.expect(lambda m: m.command == "ERROR", 15)
    assert "RecvQ exceeded" in error.text or "Excess Flood" in error.text


@pytest.mark.slow
async def test_a_backlog_flows_at_the_default_rate_on_inspircds_default_connect_class_without_lag_or_disconnect(
        insp: InspircdAnope, irc_clients: Any) -> None:
    # insp.port uses the DEFAULT connect class: 1 s of penalty per line, 10 s threshold,
    # small RecvQ; the control above shows it cuts off a sender that does not pace.  At the
    # default pacing the bot's lines arrive at 1/s after the burst, and the server processes
    # each at once: with echo-message, a line the server lagged would stay unconfirmed.
    assert (DEFAULT_RATE, DEFAULT_BURST) == (1.0, 5)
    lines, paced = 15, 10            # the burst may be smaller than 5: the JOIN and WHO spent tokens

    async def ignore(message: Message) -> None:
        pass

    bot = IrcTransport(IrcConfig(name=NET, host="127.0.0.1", port=insp.port, tls=False, nick="floodbot",
                                 channels=("#flood",)))
    await bot.start(ignore)
    try:
        human, _ = await asyncio.gather(irc_clients(insp.helper_port, "mallory"), bot.wait_ready(15))
        await human.join("#flood")
        await bot.send(Room("irc", NET, "#flood"), "\n".join(f"{i:03d} " + "x" * 60 for i in range(lines)))
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        most_unconfirmed = 0
        for i in range(lines):
            [line] = await human.messages_from("floodbot", 1, timeout=5)
            assert int(line.text[:3]) == i
            arrivals.append(loop.time())
            most_unconfirmed = max(most_unconfirmed, bot.unconfirmed())
        assert "echo-message" in bot._session.caps    # type: ignore[union-attr]
        steady = arrivals[-paced:]                             # well after the burst
        rate = (len(steady) - 1) / (steady[-1] - steady[0])
        assert 0.9 * DEFAULT_RATE <= rate <= 1.05 * DEFAULT_RATE
        assert most_unconfirmed <= 2                           # no fakelag: every line processed at once
        assert bot.connected and bot.disconnects == 0
        assert not [m for m in human.lines if m.command == "QUIT" and m.nick == "floodbot"]
    finally:
        await bot.close(flush_timeout=1)


# -- fairness and private output (issues found on real servers) ----------------------------------

async def test_one_users_long_answer_does_not_hold_up_anothers_and_goes_when_they_quit(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Default pacing (1 line/s after a burst of 5) on the DEFAULT connect class.  The old
    # single queue made carol wait behind mallory's 200 lines: over three minutes.
    caplog.set_level(logging.INFO, "bot.transports.irc")
    bot, mallory, carol = await asyncio.gather(
        irc_bots(irc_config(insp.port, nick="fairbot", channels=("#fair",))),
        irc_clients(insp.helper_port, "mallory"), irc_clients(insp.helper_port, "carol"))
    await asyncio.gather(mallory.join("#fair"), carol.join("#fair"))
    await bot.send(Identity("irc", NET, "mallory"), "\n".join(f"flood {i:03d}" for i in range(200)))
    loop = asyncio.get_running_loop()
    arrived = [loop.time()]
    while arrived[-1] - arrived[-2 if len(arrived) > 1 else -1] < 0.5:      # the burst, until pacing holds lines
        await mallory.messages_from("fairbot", 1, timeout=5)
        arrived.append(loop.time())

    asked = loop.time()
    reply = await carol.ask("#fair", "!help whoami", "fairbot", timeout=5)
    assert reply.text.startswith("carol: whoami - ")
    assert loop.time() - asked < 2.0
    assert bot.pending() <= DEFAULT_MAX_QUEUED                     # capped: the rest is one note
    assert any("left out: at most 60 may wait per target" in r.getMessage() for r in caplog.records)

    await mallory.close()                                          # gone: so are the lines queued for her
    await wait_for(lambda: bot.pending() == 0, 3)
    assert sum("dropped" in r.getMessage() and "mallory" in r.getMessage() for r in caplog.records) == 1


async def ps_all_in_private(irc_engine: Any, instances: int = 35) -> None:
    for _ in range(instances):
        await irc_engine.launch("waiting", {}, actor="test")


async def test_private_lines_follow_a_nick_change_and_never_reach_whoever_takes_the_nick(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, irc_engine: Any) -> None:
    # alice (a services account) asks for ps all in a channel she shares with the bot:
    # 35 lines, paced, to her privately.  She changes nick; someone not logged in takes
    # "alice".  The old queue went by nick: the newcomer got the rest of alice's answer.
    await ps_all_in_private(irc_engine)
    users = [User("alice", irc={NET: IrcIds(("alice",))}, roles=ADMINS)]
    bot, alice, newcomer = await asyncio.gather(
        irc_bots(irc_config(insp.helper_port, nick="privbot", channels=("#priv",), pacing_rate=30.0), users=users),
        irc_clients(insp.helper_port, "alice", sasl=ALICE), irc_clients(insp.helper_port, "newcomer"))
    await alice.join("#priv")
    alice.say("#priv", "!ps all")
    note = await alice.expect(lambda m: m.nick == "privbot" and m.params[0] == "#priv")
    assert note.text == "alice: 35 lines, sent to you privately"
    first = await alice.messages_from("privbot", 3, target="alice")
    alice.send("NICK alice_away")
    await alice.expect(lambda m: m.command == "NICK" and m.params[0] == "alice_away")
    newcomer.send("NICK alice")                                   # the nick is free: anyone may take it
    await newcomer.expect(lambda m: m.command == "NICK" and m.params[0] == "alice")
    rest = await alice.messages_from("privbot", 32, timeout=10)
    assert {m.params[0] for m in rest} == {"alice_away"}
    assert [m.text.split()[0] for m in first + rest] == [f"#{i}" for i in range(35, 0, -1)]
    await wait_for(lambda: bot.pending() == 0, 3)
    assert await newcomer.quiet("privbot", 0.2) == []
    assert not any(m.nick == "privbot" for m in newcomer.lines if m.command in ("PRIVMSG", "NOTICE"))


async def test_private_lines_to_a_nick_the_bot_cannot_watch_are_checked_and_dropped_once_it_changed_hands(
        insp: InspircdAnope, irc_bots: BotFactory, irc_clients: Any, irc_engine: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # alice shares no channel with the bot: it does not see her change nick, so before each
    # line it checks (WHO) that "alice" is still logged in as alice.
    caplog.set_level(logging.INFO, "bot.transports.irc")
    await ps_all_in_private(irc_engine)
    users = [User("alice", irc={NET: IrcIds(("alice",))}, roles=ADMINS)]
    bot, alice, newcomer = await asyncio.gather(
        irc_bots(irc_config(insp.helper_port, nick="privbot2", channels=(), pacing_rate=10.0), users=users),
        irc_clients(insp.helper_port, "alice", sasl=ALICE), irc_clients(insp.helper_port, "newcomer"))
    alice.say("privbot2", "ps all")
    await alice.messages_from("privbot2", 3, target="alice")
    alice.send("NICK alice_away")
    await alice.expect(lambda m: m.command == "NICK" and m.params[0] == "alice_away")
    newcomer.send("NICK alice")
    await newcomer.expect(lambda m: m.command == "NICK" and m.params[0] == "alice")
    await wait_for(lambda: bot.pending() == 0, 5)
    assert await newcomer.quiet("privbot2", 0.2) == []
    assert not any(m.nick == "privbot2" for m in newcomer.lines if m.command in ("PRIVMSG", "NOTICE"))
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "queued for alice: " in drops[0], drops       # the rest, once
