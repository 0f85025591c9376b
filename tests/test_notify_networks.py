"""Notifications and durable replies in the deployed bot (real ``run_bot.py``)
on a real IRC server (ngircd, with its flood penalties on) and a real SMTP
server (aiosmtpd): a burst collapsed into one summary without the bot being
thrown off, chat falling back to mail for an offline user, a reply to a
command delivered after a SIGKILL, and nobody else receiving a private
message meant for a user."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.botproc import Bot, make_home
from tests.servers import need
from tests.serverkit.irc import Human, Ngircd, start_ngircd
from tests.serverkit.smtp import SmtpSink

BOOM = """
name: boom
project: Project
launch_roles: [dev]
steps:
  - participant: fail
    params: {message: mirror down}
"""
WAITS = """
name: waits
project: Project
launch_roles: [dev]
steps:
  - participant: hold
"""
USERS = """
users:
  admin:
    roles:
      "*": [admins]
  alice:
    irc:
      net: {hostmasks: ["alice!~alice@127.0.0.1"]}
    email: [alice@example.org]
    roles:
      "Project": [dev]
"""


@pytest.fixture
def flood_ngircd(tmp_path: Path) -> Iterator[Ngircd]:
    server = need(lambda: start_ngircd(tmp_path / "ngircd", penalties=True))
    try:
        yield server
    finally:
        server.stop()


def home(tmp_path: Path, irc: Ngircd, sink: SmtpSink) -> Path:
    return make_home(tmp_path, {"boom": BOOM, "waits": WAITS}, users=USERS, bot_extra=f"""
        outbox: {{retry_min: 0.2s, retry_max: 1s}}
        notifications:
          flood_per_minute: 8
          flood_window: 3s
          projects:
            Project:
              routes:
                - {{events: [failed], to: ["irc:net:#rel"]}}
        networks:
          - protocol: irc
            name: net
            host: 127.0.0.1
            port: {irc.port}
            tls: false
            nick: notebot
            channels: ["#rel"]
            pacing_rate: 2
            pacing_burst: 4
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {sink.port}
            security: plaintext
            from: bot@example.test
    """)


async def connect_as(port: int, nick: str, username: str) -> Human:
    """A client with ``nick`` but another user name (so another nick!user@host)."""
    human = Human(nick)
    human.reader, human.writer = await asyncio.open_connection("127.0.0.1", port)
    human._task = asyncio.get_running_loop().create_task(human._read())
    human.send(f"NICK {nick}")
    human.send(f"USER {username} 0 * :{username}")
    await human.expect(lambda m: m.command == "001")
    return human


async def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_burst_is_one_summary_and_the_bot_stays_on(tmp_path: Path, flood_ngircd: Ngircd,
                                                           smtp_sinks: Any) -> None:
    bot = Bot(home(tmp_path, flood_ngircd, smtp_sinks())).start()
    watcher = await Human.connect(flood_ngircd.port, "watcher")
    try:
        await watcher.join("#rel")
        await asyncio.sleep(0.5)
        for _ in range(500):                      # a mirror outage: 500 instances fail at once
            bot.send("launch boom")
        await wait_for(lambda: sum(1 for s in bot.statuses().values() if s == "failed") == 500, timeout=60)
        texts: list[str] = []
        while True:                                    # every line until the channel goes quiet
            more = await watcher.quiet("notebot", 3.5)      # > a window plus a flush
            if not more:
                break
            texts += [line.params[-1] for line in more if line.params[0] == "#rel"]
        singles = [t for t in texts if t.startswith("[Project] boom #")]
        summaries = [t for t in texts if t.startswith("... and ")]
        # collapsed: at most 8 lines (and a summary) per 3 s window the burst spanned, far fewer
        # lines than events (a slow machine spreads the 500 launches over more windows)
        assert summaries and len(texts) < 100, (len(singles), len(summaries), texts[:12])
        told = len(singles) + sum(int(t.split()[2]) for t in summaries)
        assert told == 500, (len(singles), summaries)   # nothing dropped, nothing doubled
        assert all("failed in Project" in t for t in summaries), summaries
        assert sum(1 for s in bot.statuses().values() if s == "failed") == 500
        assert not [line for line in bot.log if "connection lost" in line.lower() or "excess flood" in line.lower()]
    finally:
        await watcher.close()
        assert bot.stop() == 0


async def test_offline_user_gets_mail_then_chat_and_an_impostor_nothing(tmp_path: Path, flood_ngircd: Ngircd,
                                                                         smtp_sinks: Any) -> None:
    sink = smtp_sinks()
    bot = Bot(home(tmp_path, flood_ngircd, sink)).start()
    impostor = await connect_as(flood_ngircd.port, "alice", "mallory")   # alice's nick, not her user@host
    await impostor.join("#rel")                       # even beside the bot, in its channel
    try:
        assert bot.ask("as alice subscribe Project failed via net")[0].startswith("subscribed: [1] Project failed")
        assert bot.ask("as alice fallback email on")[0].startswith("fallback email on")
        bot.send("launch boom")
        [mail] = await wait_for(lambda: [r for r in list(sink.received) if "alice@example.org" in r.rcpt_tos])
        assert "boom #1 failed at fail@0: mirror down" in mail.message.get_content()
        heard = await impostor.quiet("notebot", 0.5)
        assert [line.params[0] for line in heard] in ([], ["#rel"])   # the channel's line; nothing private
        await impostor.close()
        alice = await Human.connect(flood_ngircd.port, "alice")
        await alice.join("#rel")
        await asyncio.sleep(0.5)
        bot.send("launch boom")
        private = await alice.expect(lambda line: line.command == "PRIVMSG" and line.params[0] == "alice"
                                     and "boom #2 failed" in line.params[-1], timeout=15)
        assert private.prefix.startswith("notebot!")
        await alice.close()
    finally:
        assert bot.stop() == 0


async def test_a_launch_reply_is_delivered_after_a_sigkill(tmp_path: Path, flood_ngircd: Ngircd,
                                                           smtp_sinks: Any) -> None:
    conf = home(tmp_path, flood_ngircd, smtp_sinks())
    bot = Bot(conf).start()
    alice = await Human.connect(flood_ngircd.port, "alice")
    try:
        await alice.join("#rel")
        await asyncio.sleep(0.5)
        alice.send("PRIVMSG notebot :launch waits")
        alice.send("QUIT :gone")                      # gone before the reply can reach her
        await asyncio.sleep(0.1)
        await wait_for(lambda: bot.statuses() == {1: "waiting"})
        await wait_for(lambda: bot.db().execute("SELECT attempts FROM outbox_messages").fetchone()[0] >= 1)
        bot.kill()                                    # the reply is committed, not delivered
    finally:
        await alice.close()
    bot = Bot(conf).start()
    try:
        alice = await Human.connect(flood_ngircd.port, "alice")
        await alice.join("#rel")
        line = await alice.expect(lambda line: line.command == "PRIVMSG" and line.params[0] == "alice", timeout=15)
        assert line.params[-1] == "launched waits as #1 (re: launch waits)"
        assert not await alice.quiet("notebot", 1.0)      # once
        await alice.close()
    finally:
        assert bot.stop() == 0
