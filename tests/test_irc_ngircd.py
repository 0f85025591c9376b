"""The IRC front-end against real ngircd servers on 127.0.0.1 (fast, one per
test, no services): commands and answers, line splitting, pacing on the
wire, reconnection and resending, TLS, and the bot's own nick.  A raw client
plays the human (``tests/serverkit/irc.py``)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from bot.access import IrcIds, User
from bot.chat import Identity, Room, TransportError
from bot.transports.irc.delivery import MARKER_AGE
from engine.engine import Engine
from tests.servers import free_port, require_binary
from tests.servers.irc import (BOT, NET, BotFactory, Human, Ngircd, bot_lines, fast, irc_config, wait_for)
from tests.servers.tls import ThrowawayCA
from tests.serverkit.irc import TcpProxy

pytestmark = pytest.mark.servers
ADMINS = {"*": frozenset({"admins"})}


# -- commands and replies (ngircd) ------------------------------------------------------------------

async def test_commands_by_prefix_by_nick_and_in_private_are_answered_where_they_came_from(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    await irc_bots(fast(ngircd.port))
    human = await irc_clients(ngircd.port, "carol")
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

    # The addressing rule of every network (bot.addressing): "! ps" is "ps"; a bare prefix or
    # address gets a hint.
    reply = await human.ask("#ops", "! help whoami", BOT)
    assert (reply.params[0], reply.text) == (
        "#ops", "carol: whoami - who the bot thinks you are, and how that was verified")
    for bare in ("!", "releasebot:"):
        reply = await human.ask("#ops", bare, BOT)
        assert reply.text == "carol: say 'help' for the list of commands"

    for chatter in ("hello all", "releasebot is great", "releasebotx: help", "x!ps"):
        human.say("#ops", chatter)
    human.send(f"NOTICE {BOT} :help")                                    # notices are never answered
    assert await human.quiet(BOT, 0.5) == []


async def test_output_longer_than_a_room_allows_goes_to_the_caller_privately(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any, irc_engine: Engine) -> None:
    # ngircd has no services: this admin is recognised by an explicitly listed hostmask
    admin = User("dave", irc={NET: IrcIds(hostmasks=("dave!~dave@127.0.0.1",))}, roles=ADMINS)
    await irc_bots(fast(ngircd.port), users=[admin])
    human = await irc_clients(ngircd.port, "dave")
    await human.join("#ops")
    for _ in range(6):
        await irc_engine.launch("waiting", {}, actor="test")

    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text.startswith("dave: dave on testnet is dave, verified by hostmask (weaker)")
    human.say("#ops", "!ps")
    lines = await human.messages_from(BOT, 7)
    assert (lines[0].params[0], lines[0].text) == ("#ops", "dave: 6 lines, sent to you privately")
    assert [m.params[0] for m in lines[1:]] == ["dave"] * 6
    assert sorted(m.text.split()[0] for m in lines[1:]) == [f"#{i}" for i in range(1, 7)]


async def test_long_and_multiline_text_is_split_never_truncated(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot = await irc_bots(fast(ngircd.port))
    human = await irc_clients(ngircd.port, "erin")
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


async def test_outbound_lines_are_paced_by_the_token_bucket(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot = await irc_bots(irc_config(ngircd.port, pacing_rate=40.0, pacing_burst=5))
    human = await irc_clients(ngircd.port, "frank")
    await human.join("#ops")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await bot.send(Room("irc", NET, "#ops"), "\n".join(f"n{i}" for i in range(25)))
    lines = await human.messages_from(BOT, 25)
    elapsed = loop.time() - start
    assert [m.text for m in lines] == [f"n{i}" for i in range(25)]
    assert elapsed >= (25 - 5) / 40 * 0.9                   # burst 5, then 40 lines/s (the policy: test_irc_delivery)


# -- reconnection (ngircd) ----------------------------------------------------------------------------

async def test_server_killed_and_restarted_bot_reconnects_rejoins_and_delivers_queued_lines_once(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await irc_bots(fast(proxy.port))
        human = await irc_clients(ngircd.port, "grace")
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
        human = await irc_clients(ngircd.port, "grace")
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
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    proxy = await TcpProxy(ngircd.port).start()
    try:
        bot = await irc_bots(fast(proxy.port, ping_interval=0.5, ping_timeout=0.5))
        human = await irc_clients(ngircd.port, "heidi")
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
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    # ngircd has no echo-message: only marker PINGs confirm.  The bot is paced
    # at 10 lines/s, and the server is killed mid-burst at a moment when it had
    # confirmed every line written so far.  The old marker (every 10 s while
    # lines were queued) left no such moment: every line since the last one
    # was unconfirmed, and all those the server had relayed came twice.
    # (Not with penalties: ngircd then answers a PING only at its next
    # once-a-second tick, so up to a second of lines is always unconfirmed.)
    server = ngircd
    proxy = await TcpProxy(server.port).start()
    try:
        bot = await irc_bots(irc_config(proxy.port, pacing_rate=10.0, pacing_burst=5))
        human = await irc_clients(server.port, "quinn")
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
        human = await irc_clients(server.port, "quinn")
        await human.join("#ops")
        proxy.accepting = True
        await human.expect(lambda m: m.command == "PRIVMSG" and m.nick == BOT and m.text == sent[-1], 30)
        await asyncio.sleep(0.5)
        after = bot_lines(human, BOT)
        assert before + after == sent            # each line once, in order: no duplicate, no loss
        assert bot.disconnects == 1
    finally:
        await proxy.close()


async def test_close_flushes_queued_lines_and_quits(ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    bot = await irc_bots(fast(ngircd.port))
    human = await irc_clients(ngircd.port, "ivan")
    await human.join("#ops")
    await bot.send(Identity("irc", NET, "ivan"), "one\ntwo\nthree")
    await bot.close()
    assert [m.text for m in await human.messages_from(BOT, 3)] == ["one", "two", "three"]
    quit_line = await human.expect(lambda m: m.command == "QUIT" and m.nick == BOT)
    assert "stopping" in quit_line.text
    with pytest.raises(TransportError):
        await bot.send(Room("irc", NET, "#ops"), "too late")


async def test_sending_to_another_network_or_a_malformed_target_is_refused(ngircd: Ngircd, irc_bots: BotFactory) -> None:
    bot = await irc_bots(fast(ngircd.port))
    with pytest.raises(TransportError):
        await bot.send(Room("xmpp", "jabber", "ops@conference.example.org"), "hi")
    with pytest.raises(TransportError):
        await bot.send(Identity("irc", NET, "x :injected"), "hi")


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
            if r.name.startswith("bot.transports.irc") and r.levelno == logging.WARNING and "TLS:" in r.getMessage()]


async def test_tls_with_ca_file_verifies_the_server_and_commands_are_answered(
        ngircd_tls: Ngircd, tls_ca: ThrowawayCA, irc_bots: BotFactory, irc_clients: Any) -> None:
    assert ngircd_tls.tls_port is not None
    bot = await irc_bots(fast(ngircd_tls.tls_port, tls=True, ca_file=str(tls_ca.ca_file)))
    human = await irc_clients(ngircd_tls.port, "tina")                # a plain client on the same server
    await human.join("#ops")
    reply = await human.ask("#ops", "!whoami", BOT)
    assert reply.text == f"tina: tina on {NET}: not identified (not verified)"
    assert (await human.ask(BOT, "help whoami", BOT)).text.startswith("whoami - ")
    assert await whois_secure(human, BOT)                        # the server: the bot came in over TLS
    assert not await whois_secure(human, "tina")
    assert bot.connections == 1


async def test_tls_without_ca_file_refuses_the_untrusted_server_logs_it_and_keeps_retrying(
        ngircd_tls: Ngircd, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    assert ngircd_tls.tls_port is not None
    bot = await irc_bots(fast(ngircd_tls.tls_port, tls=True), ready=False)   # tls_verify defaults to true
    await wait_for(lambda: len(tls_warnings(caplog)) >= 3)                # refused, retried, refused ...
    assert tls_warnings(caplog)[0] == (
        f"{NET}: TLS: refused the certificate of 127.0.0.1:{ngircd_tls.tls_port} (unable to get local "
        "issuer certificate); checked against the system's CAs: set ca_file to the CA that signed it "
        "(or tls_verify: false, for a test server only)")
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)
    assert (bot.connected, bot.connections) == (False, 0)
    assert bot._task is not None and not bot._task.done()                 # still trying, not crashed
    human = await irc_clients(ngircd_tls.port, "uma")
    human.send(f"WHOIS {BOT}")
    assert (await human.expect(lambda m: m.command in ("311", "401"))).command == "401"


async def test_tls_verify_false_accepts_the_untrusted_server(
        ngircd_tls: Ngircd, irc_bots: BotFactory, irc_clients: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    assert ngircd_tls.tls_port is not None
    await irc_bots(fast(ngircd_tls.tls_port, tls=True, tls_verify=False))
    human = await irc_clients(ngircd_tls.port, "vic")
    await human.join("#ops")
    assert (await human.ask("#ops", "!help", BOT)).text.startswith("vic: commands: ")
    assert await whois_secure(human, BOT)
    assert tls_warnings(caplog) == []


async def test_tls_with_ca_file_still_checks_the_host_name(
        tmp_path: Path, tls_ca: ThrowawayCA, irc_bots: BotFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "bot.transports.irc")
    # signed by the trusted CA, but for another name: the CA alone must not be enough
    cert = tls_ca.issue(tmp_path / "certs", dns=("irc.elsewhere.test",), ips=())
    server = Ngircd(tmp_path / "ngircd", free_port(), binary=require_binary("ngircd"), tls=cert).start()
    try:
        assert server.tls_port is not None
        bot = await irc_bots(fast(server.tls_port, tls=True, ca_file=str(tls_ca.ca_file)), ready=False)
        await wait_for(lambda: len(tls_warnings(caplog)) >= 1)
        assert tls_warnings(caplog)[0] == (
            f"{NET}: TLS: refused the certificate of 127.0.0.1:{server.tls_port} (IP address mismatch, "
            f"certificate is not valid for '127.0.0.1'.); checked against ca_file {tls_ca.ca_file}")
        assert not bot.connected
    finally:
        server.stop()


async def test_a_taken_nick_makes_the_bot_use_another_and_answer_to_that(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    squatter = await irc_clients(ngircd.port, BOT)
    await squatter.join("#ops")
    bot = await irc_bots(fast(ngircd.port))
    assert bot.nick == BOT + "_"
    reply = await squatter.ask("#ops", f"{BOT}_: help whoami", bot.nick)
    assert reply.text.startswith("releasebot: whoami - ")
    squatter.say("#ops", f"{BOT}: help")                    # addressed to the squatter, not the bot
    assert await squatter.quiet(bot.nick, 0.3) == []


async def test_the_bot_takes_its_nick_back_as_soon_as_the_holder_quits(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    holder = await irc_clients(ngircd.port, BOT)                  # e.g. the bot's own ghost, in the bot's channel
    await holder.join("#ops")
    bot = await irc_bots(fast(ngircd.port), nick_retry=3600)     # no periodic retry within the test: the QUIT it is
    assert bot.nick == BOT + "_"
    await holder.close()
    await wait_for(lambda: bot.nick == BOT, 3)
    human = await irc_clients(ngircd.port, "rita")
    await human.join("#ops")
    assert (await human.ask("#ops", f"{BOT}: help whoami", BOT)).text.startswith("rita: whoami - ")


async def test_the_bot_retries_its_nick_periodically_when_it_cannot_see_the_holder_leave(
        ngircd: Ngircd, irc_bots: BotFactory, irc_clients: Any) -> None:
    holder = await irc_clients(ngircd.port, BOT)                  # shares no channel with the bot
    bot = await irc_bots(fast(ngircd.port), nick_retry=0.3)
    assert bot.nick == BOT + "_"
    human = await irc_clients(ngircd.port, "sam")
    await human.join("#ops")
    await asyncio.sleep(1.0)                                 # a few refused tries: nothing changes
    assert bot.nick == BOT + "_" and bot.connections == 1
    assert (await human.ask("#ops", f"{BOT}_: help whoami", BOT + "_")).text.startswith("sam: whoami - ")
    await holder.close()
    await wait_for(lambda: bot.nick == BOT, 3)
    nick = await human.expect(lambda m: m.command == "NICK" and m.nick == BOT + "_")
    assert nick.params[0] == BOT
