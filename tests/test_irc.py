"""The IRC front-end against real servers on 127.0.0.1: ngircd for plain IRC
(fast, one per test) and one InspIRCd + Anope pair per session for NickServ
accounts, SASL and IRCv3 account tags.  A second, raw client plays the human.

The bot is wired as in production: Router(Dispatcher(real engine, Directory,
default commands)).serve(IrcTransport(config)).
"""
from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from bot.access import Directory, IrcIds, User
from bot.chat import Identity, Message, Room, TransportError
from bot.commands import Dispatcher, default_registry
from bot.config import load_config
from bot.router import Router
from bot.transports.irc import (DEFAULT_BURST, DEFAULT_CAPS, DEFAULT_RATE, MARKER_AGE, IrcConfig, IrcTransport,
                                clean_lines, is_loopback, parse_config, split_utf8)
from engine.engine import Engine
from engine.participants import ParticipantRegistry
from engine.yamlconfig import ConfigError, loads_yaml
from engine.store import Store
from engine.timers import ManualClock
from participants import discover
from tests.engine_fixtures import spec_from_yaml
from tests.servers import free_port, require_binary
from tests.servers.irc import Human, InspircdAnope, Ngircd, parse_line
from tests.servers.tls import ThrowawayCA

ROOT = Path(__file__).resolve().parent.parent
NET = "testnet"
BOT = "releasebot"
BOT_ACCOUNT = ("releasebot", "botpw-1")
BOSS = ("boss", "bosspw-1")          # the admin's services account
ALICE = ("alice", "alicepw-1")
ADMINS = {"*": frozenset({"admins"})}

WAITING = """\
    description: stays waiting until answered
    steps:
      - participant: hold
"""


# -- wiring -----------------------------------------------------------------------------------

@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    registry = ParticipantRegistry(discover())
    specs = {"waiting": spec_from_yaml("waiting", WAITING, registry.names())}
    store = Store(tmp_path / "bot.sqlite3")
    store.open()
    eng = Engine(store, specs, registry, clock=ManualClock(), use_scheduler=False)
    await eng.start()
    yield eng
    await eng.stop()
    await asyncio.to_thread(store.close)


BotFactory = Callable[..., Awaitable[IrcTransport]]


@pytest.fixture
async def bots(engine: Engine) -> AsyncIterator[BotFactory]:
    """``await bots(config, users=[...], **IrcTransport options)``: a started, ready bot;
    closed after the test."""
    started: list[IrcTransport] = []

    async def factory(config: IrcConfig, users: list[User] = (), max_room_lines: int = 4,  # type: ignore[assignment]
                      ready: bool = True, **options: Any) -> IrcTransport:
        transport = IrcTransport(config, **options)
        started.append(transport)
        router = Router(Dispatcher(engine, Directory(list(users)), default_registry()), max_room_lines)
        await router.serve(transport)
        if ready:
            await transport.wait_ready(15)
        return transport

    yield factory
    for transport in started:
        await transport.close(flush_timeout=1)


@pytest.fixture
async def humans() -> AsyncIterator[Callable[..., Awaitable[Human]]]:
    made: list[Human] = []

    async def connect(port: int, nick: str, **kwargs: Any) -> Human:
        human = await Human.connect(port, nick, **kwargs)
        made.append(human)
        return human

    yield connect
    for human in made:
        await human.close()


def config(port: int, **overrides: Any) -> IrcConfig:
    settings: dict[str, Any] = dict(name=NET, host="127.0.0.1", port=port, tls=False, nick=BOT,
                                    channels=("#ops",), reconnect_min=0.1, reconnect_max=0.5)
    settings.update(overrides)
    return IrcConfig(**settings)


def fast(port: int, **overrides: Any) -> IrcConfig:
    """For ngircd without flood penalties: pacing out of the way."""
    return config(port, pacing_rate=1000.0, pacing_burst=1000, **overrides)


@pytest.fixture(scope="session")
def insp(inspircd_anope: InspircdAnope) -> InspircdAnope:
    inspircd_anope.register(BOT_ACCOUNT, BOSS, ALICE)
    return inspircd_anope


class TcpProxy:
    """Between the bot and ngircd: can refuse new connections (to order a
    reconnect after the human rejoined) and black-hole live ones (a network
    that silently stops delivering, in both directions)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.accepting = True
        self.links: list[dict[str, Any]] = []

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        link: dict[str, Any] = {"frozen": False, "writers": (writer, up_writer)}
        self.links.append(link)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not link["frozen"]:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def freeze(self) -> None:
        for link in self.links:
            link["frozen"] = True

    async def close(self) -> None:
        self.server.close()
        for link in self.links:
            for w in link["writers"]:
                w.close()


def bot_lines(human: Human, nick: str) -> list[str]:
    return [m.text for m in human.lines if m.command in ("PRIVMSG", "NOTICE") and m.nick == nick]


# -- commands and replies (ngircd) ------------------------------------------------------------------

async def test_commands_by_prefix_by_nick_and_in_private_are_answered_where_they_came_from(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    await bots(fast(ngircd.port))
    human = await humans(ngircd.port, "carol")
    await human.join("#ops")

    reply = await human.ask("#ops", "!help", BOT)
    assert reply.params[0] == "#ops" and reply.text.startswith("carol: commands: ")   # room answers are addressed
    reply = await human.ask("#ops", "releasebot: whoami", BOT)
    assert reply.params[0] == "#ops"
    assert reply.text == f"carol: carol on {NET}: not identified (not verified)"
    reply = await human.ask("#ops", "ReleaseBot, help whoami", BOT)     # nicks are case-insensitive
    assert (reply.params[0], reply.text) == (
        "#ops", "carol: whoami - who the bot thinks you are, and how that was verified")
    reply = await human.ask(BOT, "whoami", BOT)                          # private: every line is a command
    assert reply.params[0] == "carol" and reply.text.startswith("carol on testnet")
    reply = await human.ask(BOT, "!help whoami", BOT)                    # the prefix is allowed there too
    assert reply.params[0] == "carol" and reply.text.startswith("whoami - ")

    for chatter in ("hello all", "releasebot is great", "! ps", "!", "releasebot:", "releasebotx: help"):
        human.say("#ops", chatter)
    human.send(f"NOTICE {BOT} :help")                                    # notices are never answered
    assert await human.quiet(BOT, 0.5) == []


async def test_output_longer_than_a_room_allows_goes_to_the_caller_privately(
        ngircd: Ngircd, bots: BotFactory, humans: Any, engine: Engine) -> None:
    # ngircd has no services: this admin is recognised by an explicitly listed hostmask
    admin = User("dave", irc={NET: IrcIds(hostmasks=("dave!~dave@127.0.0.1",))}, roles=ADMINS)
    await bots(fast(ngircd.port), users=[admin])
    human = await humans(ngircd.port, "dave")
    await human.join("#ops")
    for _ in range(6):
        await engine.launch("waiting", {}, actor="test")

    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text.startswith("dave: dave on testnet is dave, verified by hostmask (weaker)")
    human.say("#ops", "!ps")
    lines = await human.messages_from(BOT, 7)
    assert (lines[0].params[0], lines[0].text) == ("#ops", "dave: 6 lines, sent to you privately")
    assert [m.params[0] for m in lines[1:]] == ["dave"] * 6
    assert sorted(m.text.split()[0] for m in lines[1:]) == [f"#{i}" for i in range(1, 7)]


async def test_long_and_multiline_text_is_split_never_truncated(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    bot = await bots(fast(ngircd.port))
    human = await humans(ngircd.port, "erin")
    await human.join("#ops")
    words = [f"wörd{i}€" for i in range(300)]            # multi-byte characters, ~2.7 KB
    await bot.send(Room("irc", NET, "#ops"), "first line\n\n" + " ".join(words) + "\r\nlast\x00line")
    got: list[str] = []
    while not got or got[-1] != "last\ufffdline":
        [line] = await human.messages_from(BOT, 1)
        assert len(line.raw.encode()) + 2 <= 512              # as relayed, with our prefix
        got.append(line.text)
    assert got[0] == "first line"
    assert len(got) >= 5                                     # the long line took several
    assert " ".join(got[1:-1]).split() == words              # every word, in order, none cut


def test_splitting_respects_utf8_and_prefers_spaces() -> None:
    head, rest = split_utf8("ab€cd", 4)                    # € is 3 bytes: never cut inside it
    assert (head, rest) == ("ab", "€cd")
    head, rest = split_utf8("alpha beta gamma", 12)
    assert (head, rest) == ("alpha beta", "gamma")
    assert split_utf8("short", 100) == ("short", "")
    assert clean_lines("a\r\nb\n\n  \nc\u2028d") == ["a", "b", "c", "d"]


async def test_outbound_lines_are_paced_by_the_token_bucket(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    bot = await bots(config(ngircd.port, pacing_rate=40.0, pacing_burst=5))
    human = await humans(ngircd.port, "frank")
    await human.join("#ops")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await bot.send(Room("irc", NET, "#ops"), "\n".join(f"n{i}" for i in range(45)))
    lines = await human.messages_from(BOT, 45)
    elapsed = loop.time() - start
    assert [m.text for m in lines] == [f"n{i}" for i in range(45)]
    assert elapsed >= (45 - 5) / 40 * 0.9                   # burst 5, then 40 lines/s


async def test_a_confirmation_marker_never_takes_a_token_a_queued_line_needs(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    # no echo-message on ngircd: the bot confirms its lines with marker PINGs, which the
    # server counts like any line; a burst of 5 must still go out at once, marker after
    bot = await bots(config(ngircd.port, pacing_rate=2.0, pacing_burst=5))
    human = await humans(ngircd.port, "gina")
    await human.join("#ops")
    await asyncio.sleep(3.0)                                # the bucket refills to its burst of 5
    loop = asyncio.get_running_loop()
    start = loop.time()
    await bot.send(Room("irc", NET, "#ops"), "\n".join(f"b{i}" for i in range(5)))
    lines = await human.messages_from(BOT, 5)
    assert [m.text for m in lines] == [f"b{i}" for i in range(5)]
    assert loop.time() - start < 0.4                        # not 0.5 s later for the fifth


# -- reconnection (ngircd) ----------------------------------------------------------------------------

async def test_server_killed_and_restarted_bot_reconnects_rejoins_and_delivers_queued_lines_once(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await bots(fast(proxy.port))
        human = await humans(ngircd.port, "grace")
        await human.join("#ops")
        ops = Room("irc", NET, "#ops")
        await bot.send(ops, "before the crash")
        await human.messages_from(BOT, 1)
        for _ in range(100):
            if bot.pending() == 0:
                break
            await asyncio.sleep(0.02)
        assert bot.pending() == 0                            # confirmed by the server

        proxy.accepting = False                              # reconnect only once the human is back
        ngircd.kill()
        for _ in range(200):
            if not bot.connected:
                break
            await asyncio.sleep(0.02)
        assert not bot.connected
        for i in range(5):
            await bot.send(ops, f"while down {i}")
        await human.close()

        ngircd.start()                                       # same port, empty state
        human = await humans(ngircd.port, "grace")
        await human.join("#ops")
        proxy.accepting = True
        await bot.wait_ready(10)
        assert bot.disconnects == 1
        join = await human.expect(lambda m: m.command == "JOIN" and m.nick == bot.nick)
        assert join.params[0] == "#ops"
        lines = await human.messages_from(bot.nick, 5)
        assert [m.text for m in lines] == [f"while down {i}" for i in range(5)]
        assert await human.quiet(bot.nick, 0.5) == []        # nothing twice, nothing from before
        reply = await human.ask("#ops", "!whoami", bot.nick)
        assert reply.text.startswith("grace: grace on testnet")
    finally:
        await proxy.close()


async def test_a_silent_network_is_detected_by_keepalive_and_lines_written_into_it_are_resent(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await bots(fast(proxy.port, ping_interval=0.5, ping_timeout=0.5))
        human = await humans(ngircd.port, "heidi")
        await human.join("#ops")
        ops = Room("irc", NET, "#ops")
        proxy.freeze()                                       # packets vanish; no FIN, no RST
        for i in range(3):
            await bot.send(ops, f"into the void {i}")        # written, never confirmed
        for _ in range(250):
            if bot.disconnects:
                break
            await asyncio.sleep(0.02)
        assert bot.disconnects == 1                          # noticed within ping_interval + ping_timeout
        await bot.wait_ready(10)
        lines = await human.messages_from(bot.nick, 3)
        assert [m.text for m in lines] == [f"into the void {i}" for i in range(3)]
        assert await human.quiet(bot.nick, 0.5) == []
    finally:
        await proxy.close()


async def test_without_echo_message_a_crash_mid_burst_after_the_servers_confirmation_duplicates_nothing(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    # ngircd has no echo-message: only marker PINGs confirm.  The bot is paced
    # at 5 lines/s, and the server is killed mid-burst at a moment when it had
    # confirmed every line written so far.  The old marker (every 10 s while
    # lines were queued) left no such moment: every line since the last one
    # was unconfirmed, and all those the server had relayed came twice.
    # (Not with penalties: ngircd then answers a PING only at its next
    # once-a-second tick, so up to a second of lines is always unconfirmed.)
    server = ngircd
    proxy = await TcpProxy(server.port).start()
    try:
        bot = await bots(config(proxy.port, pacing_rate=5.0, pacing_burst=5))
        human = await humans(server.port, "quinn")
        await human.join("#ops")
        sent = [f"line {i:02d}" for i in range(30)]
        await bot.send(Room("irc", NET, "#ops"), "\n".join(sent))
        await wait_for(lambda: len(bot_lines(human, BOT)) >= 10 and bot.unconfirmed() == 0 and bot.pending() > 0,
                       MARKER_AGE - 3)
        assert "echo-message" not in bot._session.caps   # type: ignore[union-attr]
        proxy.accepting = False                  # no await since the check: the bot wrote nothing since
        server.kill()
        await asyncio.wait_for(human.closed.wait(), 5)
        before = bot_lines(human, BOT)
        assert 10 <= len(before) < len(sent)

        server.start()                           # same port, empty state
        human = await humans(server.port, "quinn")
        await human.join("#ops")
        proxy.accepting = True
        await human.expect(lambda m: m.command == "PRIVMSG" and m.nick == BOT and m.text == sent[-1], 30)
        await asyncio.sleep(0.5)
        after = bot_lines(human, BOT)
        assert before + after == sent            # each line once, in order: no duplicate, no loss
        assert bot.disconnects == 1
    finally:
        await proxy.close()


async def test_close_flushes_queued_lines_and_quits(ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    bot = await bots(fast(ngircd.port))
    human = await humans(ngircd.port, "ivan")
    await human.join("#ops")
    await bot.send(Identity("irc", NET, "ivan"), "one\ntwo\nthree")
    await bot.close()
    assert [m.text for m in await human.messages_from(BOT, 3)] == ["one", "two", "three"]
    quit_line = await human.expect(lambda m: m.command == "QUIT" and m.nick == BOT)
    assert "stopping" in quit_line.text
    with pytest.raises(TransportError):
        await bot.send(Room("irc", NET, "#ops"), "too late")


async def test_sending_to_another_network_or_a_malformed_target_is_refused(ngircd: Ngircd, bots: BotFactory) -> None:
    bot = await bots(fast(ngircd.port))
    with pytest.raises(TransportError):
        await bot.send(Room("xmpp", "jabber", "ops@conference.example.org"), "hi")
    with pytest.raises(TransportError):
        await bot.send(Identity("irc", NET, "x :injected"), "hi")


# -- identities, SASL and accounts (InspIRCd + Anope) --------------------------------------------------

async def test_bot_logs_in_with_sasl_and_its_lines_carry_its_account(
        insp: InspircdAnope, bots: BotFactory, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)                          # even the library's raw-line logging
    bot = await bots(config(insp.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1]))
    assert bot.account == BOT_ACCOUNT[0]
    secret = base64.b64encode(f"\0{BOT_ACCOUNT[0]}\0{BOT_ACCOUNT[1]}".encode()).decode()
    assert any("AUTHENTICATE PLAIN" in r.getMessage() for r in caplog.records)
    assert not any(secret in r.getMessage() or BOT_ACCOUNT[1] in r.getMessage() for r in caplog.records)
    human = await humans(insp.helper_port, "judy", caps=("account-tag", "message-tags"))
    await human.join("#ops")
    reply = await human.ask("#ops", "!help", BOT)
    assert reply.tags.get("account") == BOT_ACCOUNT[0]


async def test_a_wrong_sasl_password_is_logged_and_the_bot_still_serves(
        insp: InspircdAnope, bots: BotFactory, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    bot = await bots(config(insp.port, nick="releasebot2", sasl_account=BOT_ACCOUNT[0], sasl_password="wrong"))
    assert bot.account is None
    assert any("SASL login as releasebot failed" in r.getMessage() for r in caplog.records)
    assert not any("wrong" in r.getMessage() for r in caplog.records)      # never the password
    human = await humans(insp.helper_port, "karl")
    await human.join("#ops")
    assert (await human.ask("#ops", "!help", "releasebot2")).text.startswith("karl: commands:")


async def test_whoami_shows_the_services_account_of_a_sasl_user(
        insp: InspircdAnope, bots: BotFactory, humans: Any) -> None:
    await bots(config(insp.port), users=[User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)])
    human = await humans(insp.helper_port, "bossman", sasl=BOSS)       # any nick: the account counts
    await human.join("#ops")
    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text == "bossman: bossman on testnet is boss, verified by services account; roles: *: admins"


async def test_an_impostor_with_the_admins_nick_is_refused_and_the_refusal_logged(
        insp: InspircdAnope, bots: BotFactory, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "bot.commands")
    await bots(config(insp.port), users=[User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)])
    boss = await humans(insp.helper_port, "boss", sasl=BOSS)
    await boss.join("#ops")
    assert (await boss.ask("#ops", "!ps", BOT)).text == "boss: no running, waiting or failed instances"
    await boss.close()
    await asyncio.sleep(0.2)

    impostor = await humans(insp.helper_port, "boss")                     # same nick, not logged in
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
        tmp_path: Path, bots: BotFactory, humans: Any) -> None:
    # ngircd has no STATUSMSG; InspIRCd has (ISUPPORT STATUSMSG).  Its own one,
    # without services, where a channel's creator is an op.
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, helper_port, link_port = sorted(ports)
    server = InspircdAnope(tmp_path / "insp", port, helper_port, link_port, channel_modes="not").start(services=False)
    try:
        oscar = await humans(server.helper_port, "oscar")
        await oscar.join("#opsonly")                            # first in: an op
        await bots(config(server.port, channels=("#opsonly",)))
        oscar.send(f"MODE #opsonly +o {BOT}")                   # only ops get "@#opsonly" lines
        await oscar.expect(lambda m: m.command == "MODE" and BOT in m.params)
        peggy = await humans(server.helper_port, "peggy")       # not an op
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
        insp: InspircdAnope, bots: BotFactory, humans: Any) -> None:
    early = await humans(insp.helper_port, "early", sasl=ALICE)    # in the channel before the bot: WHOX
    await early.join("#track")
    caps = tuple(c for c in DEFAULT_CAPS if c != "account-tag")
    await bots(config(insp.port, channels=("#track",), request_caps=caps),
               users=[User("alice", irc={NET: IrcIds(("alice",))}), User("boss", irc={NET: IrcIds(("boss",))}, roles=ADMINS)])
    assert (await early.ask("#track", "!whoami", BOT)).text.startswith(
        "early: early on testnet is alice, verified by services")

    late = await humans(insp.helper_port, "late", sasl=BOSS)       # joins after the bot: extended-join
    await late.join("#track")
    assert (await late.ask("#track", "!whoami", BOT)).text.startswith(
        "late: late on testnet is boss, verified by services")

    anon = await humans(insp.helper_port, "boss")                  # the admin's nick, not logged in
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
        own_inspircd_anope: InspircdAnope, bots: BotFactory, humans: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    pair = own_inspircd_anope
    await asyncio.to_thread(pair.register, BOT_ACCOUNT)
    bot = await bots(config(pair.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1]),
                     sasl_recheck=0.5)
    assert bot.account == BOT_ACCOUNT[0]

    await asyncio.to_thread(pair.stop_services)       # anope saves its accounts and goes
    pair.kill_ircd()                                   # the ircd crashes ...
    await asyncio.to_thread(pair.start_ircd)           # ... and comes back, without services: no SASL
    await wait_for(lambda: bot.connections == 2 and bot.connected, 15)
    await bot.wait_ready(10)
    assert bot.account is None
    assert any("offers no SASL PLAIN" in r.getMessage() and r.levelno >= logging.WARNING for r in caplog.records)
    human = await humans(pair.helper_port, "nina", caps=("account-tag", "message-tags"))
    await human.join("#ops")
    reply = await human.ask("#ops", "!help whoami", BOT)     # it still serves, logged out
    assert reply.text.startswith("nina: whoami - ") and "account" not in reply.tags

    await asyncio.to_thread(pair.start_services)       # InspIRCd 3 lists sasl again but announces nothing
    await wait_for(lambda: bot.account == BOT_ACCOUNT[0], 15)
    reply = await human.ask("#ops", "!help whoami", BOT)
    assert reply.tags.get("account") == BOT_ACCOUNT[0]        # the server vouches for the bot again
    assert (bot.connections, bot.disconnects) == (2, 1)       # logged in after registration, no reconnect


class NoLateSaslProxy:
    """Between the bot and InspIRCd, plays a server that takes no SASL after
    registration (IRCv3 leaves that to the server): once the client was
    welcomed, its ``CAP REQ :sasl`` is answered ``NAK`` and not passed on.
    Everything else passes, both ways."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.refused = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "NoLateSaslProxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.writers += [writer, up_writer]
        nick: list[str] = []

        async def down() -> None:
            while raw := await up_reader.readline():
                line = parse_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if line.command == "001":
                    nick.append(line.params[0])
                writer.write(raw)

        async def up() -> None:
            while raw := await reader.readline():
                line = parse_line(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if nick and line.command == "CAP" and line.params[:1] == ["REQ"] and "sasl" in line.text.split():
                    self.refused += 1
                    writer.write(f":irc.test.local CAP {nick[0]} NAK :{line.text}\r\n".encode())
                    continue
                up_writer.write(raw)

        try:
            await asyncio.gather(down(), up())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()


async def test_a_server_refusing_sasl_after_registration_gets_a_clean_reconnect_and_the_bot_logs_in(
        own_inspircd_anope: InspircdAnope, bots: BotFactory, humans: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    pair = own_inspircd_anope
    await asyncio.to_thread(pair.register, BOT_ACCOUNT)
    await asyncio.to_thread(pair.stop_services)
    proxy = await NoLateSaslProxy(pair.port).start()
    try:
        bot = await bots(config(proxy.port, sasl_account=BOT_ACCOUNT[0], sasl_password=BOT_ACCOUNT[1]),
                         sasl_recheck=0.5)
        assert bot.account is None
        human = await humans(pair.helper_port, "olga")
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
        insp: InspircdAnope, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "irc.client_aio")
    seen: list[Message] = []

    async def record(message: Message) -> None:
        seen.append(message)

    bot = IrcTransport(config(insp.port, channels=("#echo",)))
    await bot.start(record)
    try:
        await bot.wait_ready(15)
        human = await humans(insp.helper_port, "lena")
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
        insp: InspircdAnope, humans: Any) -> None:
    """The control for the next test: on this port an unpaced burst is fatal."""
    flooder = await humans(insp.port, "flooder")
    await flooder.join("#flood-control")
    flooder.writer.write(b"".join(f"PRIVMSG #flood-control :{i:03d} {'x' * 60}\r\n".encode() for i in range(300)))
    error = await flooder.expect(lambda m: m.command == "ERROR", 15)
    assert "RecvQ exceeded" in error.text or "Excess Flood" in error.text


@pytest.mark.slow
async def test_500_lines_on_inspircds_default_connect_class_arrive_complete_in_order_without_a_disconnect(
        insp: InspircdAnope, humans: Any) -> None:
    # insp.port uses the DEFAULT connect class: 1 s of penalty per line, 10 s
    # threshold, small RecvQ.  A naive sender is cut off after ~200 lines.
    assert (DEFAULT_RATE, DEFAULT_BURST) == (1.0, 5)

    async def ignore(message: Message) -> None:
        pass

    bot = IrcTransport(IrcConfig(name=NET, host="127.0.0.1", port=insp.port, tls=False, nick="floodbot",
                                 channels=("#flood",)))
    await bot.start(ignore)
    try:
        await bot.wait_ready(15)
        human = await humans(insp.helper_port, "mallory")
        await human.join("#flood")
        text = "\n".join(f"{i:03d} " + "x" * 60 for i in range(500))
        await bot.send(Room("irc", NET, "#flood"), text)
        lines = await human.messages_from("floodbot", 500, timeout=600)
        assert [int(m.text[:3]) for m in lines] == list(range(500))
        assert bot.connected and bot.disconnects == 0
        assert not [m for m in human.lines if m.command == "QUIT" and m.nick == "floodbot"]
    finally:
        await bot.close(flush_timeout=1)


# -- TLS (ngircd with a certificate from a throwaway CA; a real handshake each time) ------------------

async def whois_secure(human: Human, nick: str) -> bool:
    """Whether the server says ``nick`` is connected with TLS: in WHOIS, ngircd 26 sends
    ``275 … :is connected via SSL (secure link)`` (other servers use 671)."""
    human.send(f"WHOIS {nick}")
    secure = False
    while True:
        line = await human.expect(lambda m: m.command in ("275", "671", "311", "401", "318"))
        if line.command == "401":
            raise AssertionError(f"{nick} is not on the server")
        secure = secure or line.command in ("275", "671")
        if line.command == "318":
            return secure


def tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "bot.transports.irc" and r.levelno == logging.WARNING and "TLS:" in r.getMessage()]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_tls_with_ca_file_verifies_the_server_and_commands_are_answered(
        ngircd_tls: Ngircd, tls_ca: ThrowawayCA, bots: BotFactory, humans: Any) -> None:
    assert ngircd_tls.tls_port is not None
    bot = await bots(fast(ngircd_tls.tls_port, tls=True, ca_file=str(tls_ca.ca_file)))
    human = await humans(ngircd_tls.port, "tina")                # a plain client on the same server
    await human.join("#ops")
    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text == f"tina: tina on {NET}: not identified (not verified)"
    assert (await human.ask(BOT, "help whoami", BOT)).text.startswith("whoami - ")
    assert await whois_secure(human, BOT)                        # the server: the bot came in over TLS
    assert not await whois_secure(human, "tina")
    assert bot.connections == 1


async def test_tls_without_ca_file_refuses_the_untrusted_server_logs_it_and_keeps_retrying(
        ngircd_tls: Ngircd, bots: BotFactory, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    assert ngircd_tls.tls_port is not None
    bot = await bots(fast(ngircd_tls.tls_port, tls=True), ready=False)   # tls_verify defaults to true
    await wait_for(lambda: len(tls_warnings(caplog)) >= 3)                # refused, retried, refused ...
    assert tls_warnings(caplog)[0] == (
        f"{NET}: TLS: refused the certificate of 127.0.0.1:{ngircd_tls.tls_port} (unable to get local "
        "issuer certificate); checked against the system's CAs: set ca_file to the CA that signed it "
        "(or tls_verify: false, for a test server only)")
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)
    assert (bot.connected, bot.connections) == (False, 0)
    assert bot._task is not None and not bot._task.done()                 # still trying, not crashed
    human = await humans(ngircd_tls.port, "uma")
    human.send(f"WHOIS {BOT}")
    assert (await human.expect(lambda m: m.command in ("311", "401"))).command == "401"


async def test_tls_verify_false_accepts_the_untrusted_server(
        ngircd_tls: Ngircd, bots: BotFactory, humans: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    assert ngircd_tls.tls_port is not None
    await bots(fast(ngircd_tls.tls_port, tls=True, tls_verify=False))
    human = await humans(ngircd_tls.port, "vic")
    await human.join("#ops")
    assert (await human.ask("#ops", "!help", BOT)).text.startswith("vic: commands: ")
    assert await whois_secure(human, BOT)
    assert tls_warnings(caplog) == []


async def test_tls_with_ca_file_still_checks_the_host_name(
        tmp_path: Path, tls_ca: ThrowawayCA, bots: BotFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    # signed by the trusted CA, but for another name: the CA alone must not be enough
    cert = tls_ca.issue(tmp_path / "certs", dns=("irc.elsewhere.test",), ips=())
    server = Ngircd(tmp_path / "ngircd", free_port(), binary=require_binary("ngircd"), tls=cert).start()
    try:
        assert server.tls_port is not None
        bot = await bots(fast(server.tls_port, tls=True, ca_file=str(tls_ca.ca_file)), ready=False)
        await wait_for(lambda: len(tls_warnings(caplog)) >= 1)
        assert tls_warnings(caplog)[0] == (
            f"{NET}: TLS: refused the certificate of 127.0.0.1:{server.tls_port} (IP address mismatch, "
            f"certificate is not valid for '127.0.0.1'.); checked against ca_file {tls_ca.ca_file}")
        assert not bot.connected
    finally:
        server.stop()


# -- configuration --------------------------------------------------------------------------------

BOT_YAML = """\
networks:
  - protocol: irc
    name: libera
    host: irc.libera.chat
    nick: releasebot
    sasl_account: releasebot
    sasl_password_env: RELEASEBOT_TEST_IRC_PW
    channels: ["#ops", "#release"]
    colour: blue
    pacing_rate: fast
    reconnect_min: 10s
    reconnect_max: 5s
"""


def network_node(text: str) -> Any:
    node = loads_yaml(textwrap.dedent(text), "bot.yaml")["networks"][0]
    del node["protocol"]
    return node


def test_parse_config_reports_every_problem_with_file_and_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELEASEBOT_TEST_IRC_PW", raising=False)
    cfg, problems = parse_config(network_node(BOT_YAML), "conf/bot.yaml")
    assert cfg is None
    text = [str(p) for p in problems]
    assert any(t.startswith("conf/bot.yaml:9: irc network 'libera': unknown key 'colour'") for t in text)
    assert "conf/bot.yaml:7: irc network 'libera': sasl_password_env: environment variable " \
           "RELEASEBOT_TEST_IRC_PW is not set" in text
    assert any(t.startswith("conf/bot.yaml:10: irc network 'libera': pacing_rate: expected int or float") for t in text)
    assert any(t.startswith("conf/bot.yaml:11: irc network 'libera': reconnect_min: must not exceed") for t in text)
    assert len(problems) == 4


def test_parse_config_missing_keys_wrong_types_and_literal_secrets() -> None:
    cfg, problems = parse_config(network_node("""\
        networks:
          - protocol: irc
            tls: "yes"
            channels: [ops]
            sasl_password: hunter2
        """), "bot.yaml")
    assert cfg is None
    text = [str(p) for p in problems]
    assert "bot.yaml:2: irc network: missing 'name'" in text
    assert "bot.yaml:2: irc network: missing 'host'" in text
    assert "bot.yaml:2: irc network: missing 'nick'" in text
    assert any(t.startswith("bot.yaml:3: irc network: tls: expected bool") for t in text)
    assert any(t.startswith("bot.yaml:4: irc network: channels: 'ops' is not a channel") for t in text)
    assert any(t.startswith("bot.yaml:5: irc network: sasl_password: secrets are not written") for t in text)
    assert not any("hunter2" in t for t in text)


def test_parse_config_reads_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELEASEBOT_TEST_IRC_PW", "s3cret")
    cfg, problems = parse_config(network_node("""\
        networks:
          - protocol: irc
            name: libera
            host: irc.libera.chat
            nick: releasebot
            sasl_password_env: RELEASEBOT_TEST_IRC_PW
            channels: ["#ops"]
            pacing_rate: 2
            reconnect_max: 2m
        """), "bot.yaml")
    assert problems == []
    assert cfg is not None
    assert (cfg.sasl_account, cfg.sasl_password, cfg.server_port, cfg.tls) == ("releasebot", "s3cret", 6697, True)
    assert (cfg.pacing_rate, cfg.pacing_burst, cfg.reconnect_max, cfg.channels) == (2.0, DEFAULT_BURST, 120.0, ("#ops",))
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize("host, tls, refused", [
    ("irc.libera.chat", False, True),
    ("10.1.2.3", False, True),
    ("irc.libera.chat", True, False),
    ("127.0.0.1", False, False),
    ("127.3.2.1", False, False),
    ("localhost", False, False),
    ("::1", False, False),
])
def test_parse_config_refuses_a_sasl_password_in_plain_text_except_to_loopback(
        monkeypatch: pytest.MonkeyPatch, host: str, tls: bool, refused: bool) -> None:
    monkeypatch.setenv("RELEASEBOT_TEST_IRC_PW", "s3cret")
    cfg, problems = parse_config(network_node(f"""\
        networks:
          - protocol: irc
            name: libera
            host: "{host}"
            tls: {"true" if tls else "false"}
            nick: releasebot
            sasl_password_env: RELEASEBOT_TEST_IRC_PW
        """), "bot.yaml")
    if refused:
        assert cfg is None
        assert [str(p) for p in problems] == [
            "bot.yaml:7: irc network 'libera': sasl_password_env: SASL PLAIN sends the password readable by "
            "anyone on the way; needs tls: true (plain text only to a loopback host)"]
        assert not any("s3cret" in str(p) for p in problems)
    else:
        assert problems == [] and cfg is not None and cfg.sasl_password == "s3cret"
    assert is_loopback(host) == (host in ("127.0.0.1", "127.3.2.1", "localhost", "::1"))


def test_parse_config_ca_file_must_be_an_existing_file(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    text = """\
        networks:
          - protocol: irc
            name: libera
            host: irc.libera.chat
            nick: releasebot
            ca_file: {ca_file}
        """
    cfg, problems = parse_config(network_node(text.format(ca_file=bundle)), "bot.yaml")
    assert problems == [] and cfg is not None
    assert (cfg.ca_file, cfg.tls, cfg.tls_verify) == (str(bundle), True, True)
    cfg, problems = parse_config(network_node(text.format(ca_file=tmp_path / "missing.pem")), "bot.yaml")
    assert cfg is None
    assert [str(p) for p in problems] == ["bot.yaml:6: irc network 'libera': ca_file: no such file"]
    cfg, problems = parse_config(network_node(text.format(ca_file=tmp_path)), "bot.yaml")     # a directory
    assert [str(p) for p in problems] == ["bot.yaml:6: irc network 'libera': ca_file: no such file"]
    cfg, problems = parse_config(network_node(text.format(ca_file="[a, b]")), "bot.yaml")
    assert [str(p) for p in problems] == ["bot.yaml:6: irc network 'libera': ca_file: expected str, got ['a', 'b']"]
    cfg, problems = parse_config(network_node(text.format(ca_file=bundle) + "    ca_bundle: x\n"), "bot.yaml")
    assert len(problems) == 1 and "unknown key 'ca_bundle'" in str(problems[0])
    assert "tls, tls_verify, ca_file, nick" in str(problems[0])             # the error text names the key
    cfg, problems = parse_config(network_node(text.format(ca_file=bundle) + "    tls: false\n"), "bot.yaml")
    assert [str(p) for p in problems] == [
        "bot.yaml:6: irc network 'libera': ca_file: needs tls: true (a CA is only used to check a TLS server)"]


def test_the_bot_config_loader_reports_irc_problems_as_file_and_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELEASEBOT_TEST_IRC_PW", raising=False)
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    text = (conf / "bot.yaml").read_text()
    assert "\nnetworks: []\n" in text
    text = text.replace("\nnetworks: []\n", "\nnetworks:\n  - protocol: irc\n    name: libera\n"
                        "    host: irc.example.org\n    nick: releasebot\n"
                        "    sasl_password_env: RELEASEBOT_TEST_IRC_PW\n    colour: blue\n")
    (conf / "bot.yaml").write_text(text)
    lines = text.splitlines()
    colour = lines.index("    colour: blue") + 1
    with pytest.raises(ConfigError) as err:
        load_config(conf, ParticipantRegistry(discover()).names())
    problems = str(err.value).splitlines()
    assert any(p.startswith(f"conf/bot.yaml:{colour}: irc network 'libera': unknown key 'colour'") for p in problems)
    assert (f"conf/bot.yaml:{colour - 1}: irc network 'libera': sasl_password_env: environment variable "
            "RELEASEBOT_TEST_IRC_PW is not set") in problems


async def test_a_taken_nick_makes_the_bot_use_another_and_answer_to_that(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    squatter = await humans(ngircd.port, BOT)
    await squatter.join("#ops")
    bot = await bots(fast(ngircd.port))
    assert bot.nick == BOT + "_"
    reply = await squatter.ask("#ops", f"{BOT}_: help whoami", bot.nick)
    assert reply.text.startswith("releasebot: whoami - ")
    squatter.say("#ops", f"{BOT}: help")                    # addressed to the squatter, not the bot
    assert await squatter.quiet(bot.nick, 0.3) == []


async def test_the_bot_takes_its_nick_back_as_soon_as_the_holder_quits(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    holder = await humans(ngircd.port, BOT)                  # e.g. the bot's own ghost, in the bot's channel
    await holder.join("#ops")
    bot = await bots(fast(ngircd.port), nick_retry=3600)     # no periodic retry within the test: the QUIT it is
    assert bot.nick == BOT + "_"
    await holder.close()
    await wait_for(lambda: bot.nick == BOT, 3)
    human = await humans(ngircd.port, "rita")
    await human.join("#ops")
    assert (await human.ask("#ops", f"{BOT}: help whoami", BOT)).text.startswith("rita: whoami - ")


async def test_the_bot_retries_its_nick_periodically_when_it_cannot_see_the_holder_leave(
        ngircd: Ngircd, bots: BotFactory, humans: Any) -> None:
    holder = await humans(ngircd.port, BOT)                  # shares no channel with the bot
    bot = await bots(fast(ngircd.port), nick_retry=0.3)
    assert bot.nick == BOT + "_"
    human = await humans(ngircd.port, "sam")
    await human.join("#ops")
    await asyncio.sleep(1.0)                                 # a few refused tries: nothing changes
    assert bot.nick == BOT + "_" and bot.connections == 1
    assert (await human.ask("#ops", f"{BOT}_: help whoami", BOT + "_")).text.startswith("sam: whoami - ")
    await holder.close()
    await wait_for(lambda: bot.nick == BOT, 3)
    nick = await human.expect(lambda m: m.command == "NICK" and m.nick == BOT + "_")
    assert nick.params[0] == BOT


def test_reconnect_backoff_doubles_with_jitter_up_to_the_maximum() -> None:
    cfg = config(1, reconnect_min=1.0, reconnect_max=8.0)
    low = IrcTransport(cfg, rng=lambda: 0.0)
    high = IrcTransport(cfg, rng=lambda: 1.0)
    assert [low._backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [high._backoff(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
