"""The whole bot as it is deployed: a real ``run_bot.py`` whose bot.yaml
lists an IRC network (InspIRCd + Anope, services accounts, SASL) and an XMPP
server (prosody), with users and roles from users.yaml.  Humans on both
networks drive one engine through one dispatcher."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.botproc import ROOT, Bot, make_home
from tests.servers.irc import Human as IrcHuman
from tests.servers.irc import InspircdAnope
from tests.servers.xmpp import Prosody

NICK = "e2ebot"
IRC_BOT = ("e2ebot", "e2ebot-pw-9")
CAROL = ("carol", "carol-pw-9")          # an admin, on IRC by services account and on XMPP as alice
DAVE = ("dave", "dave-pw-9")             # a known user with no role on the project
CHANNEL = "#release"

WAITS = """
    name: waits
    project: Project
    launch_roles: [release-managers]
    inputs: {ticket: int}
    steps:
      - id: approve
        participant: hold
"""

USERS = """
users:
  admin:
    roles:
      "*": [admins]
  carol:
    irc:
      testirc: {accounts: [carol]}
    xmpp: [alice@localhost]
    roles:
      "*": [admins]
  dave:
    irc:
      testirc: {accounts: [dave]}
    roles:
      "Other": [release-managers]
"""


def networks(insp: InspircdAnope, prosody: Prosody, xmpp_password_env: str = "E2E_XMPP_PW") -> str:
    return f"""
        log_level: DEBUG
        commands:
          prefix: "!"
          rate_limit: {{commands: 50, per: 10s}}
        networks:
          - protocol: irc
            name: testirc
            host: 127.0.0.1
            port: {insp.port}
            tls: false
            nick: {NICK}
            sasl_account: {IRC_BOT[0]}
            sasl_password_env: E2E_IRC_PW
            channels: ["{CHANNEL}"]
            reconnect_min: 0.2s
            reconnect_max: 2s
          - protocol: xmpp
            name: testxmpp
            jid: bot@localhost
            password_env: {xmpp_password_env}
            host: 127.0.0.1
            port: {prosody.port}
            tls: plaintext
            nick: {NICK}
    """


ENV = {"E2E_IRC_PW": IRC_BOT[1], "E2E_XMPP_PW": "botpw"}


@pytest.fixture
def accounts(inspircd_anope: InspircdAnope) -> InspircdAnope:
    inspircd_anope.register(IRC_BOT, CAROL, DAVE)
    return inspircd_anope


@pytest.fixture
async def irc_humans(accounts: InspircdAnope) -> AsyncIterator[Callable[..., Awaitable[IrcHuman]]]:
    made: list[IrcHuman] = []

    async def connect(nick: str, sasl: tuple[str, str] | None = None) -> IrcHuman:
        human = await IrcHuman.connect(accounts.helper_port, nick, sasl=sasl)
        made.append(human)
        await human.join(CHANNEL)
        return human

    yield connect
    for human in made:
        await human.close()


async def ask_irc(human: IrcHuman, text: str, lines: int = 1, timeout: float = 15) -> list[str]:
    """Say ``text`` in the channel; the bot's answers addressed to this human, unaddressed."""
    human.say(CHANNEL, text)
    mine = f"{human.nick}: "
    answers = []
    while len(answers) < lines:
        [line] = await human.messages_from(NICK, 1, timeout)
        if line.text.startswith(mine):
            answers.append(line.text[len(mine):])
    return answers


async def until_the_bot_answers(human: IrcHuman, timeout: float = 30) -> None:
    """The bot joins on its own schedule (registration alone takes 1 s on InspIRCd)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        human.say(CHANNEL, "!help whoami")
        try:
            await human.messages_from(NICK, 1, timeout=3)
            return
        except TimeoutError:
            assert loop.time() < deadline, "the bot never answered in the channel"


@pytest.mark.servers
async def test_humans_on_irc_and_xmpp_drive_one_engine_as_themselves_and_no_one_else(
        tmp_path: Path, accounts: InspircdAnope, prosody: Prosody, irc_humans: Any, xmpp_human: Any) -> None:
    home = make_home(tmp_path, {"waits": WAITS}, bot_extra=networks(accounts, prosody), users=USERS)
    bot = Bot(home).start(env=ENV)
    try:
        carol = await irc_humans("carol_on_irc", sasl=CAROL)
        await until_the_bot_answers(carol)
        assert await ask_irc(carol, "!whoami") == [
            "carol_on_irc on testirc is carol, verified by services account; roles: *: admins"]

        # An impostor takes carol's account name as a nick: nick alone counts for nothing.
        impostor = await irc_humans("carol")
        assert (await ask_irc(impostor, "!launch waits"))[0].startswith("not authorised: launch needs a verified")

        # A known user without the role on this project may look but not launch.
        dave = await irc_humans("dave", sasl=DAVE)
        [refused] = await ask_irc(dave, "!launch waits")
        assert refused.startswith("not authorised"), refused

        assert await ask_irc(carol, f"{NICK}: launch waits ticket=7") == ["launched waits as #1 (re: launch waits ticket=7)"]

        # The same engine, seen from XMPP by carol's JID; a stranger's JID is refused.
        alice = await xmpp_human("alice")
        bot_jid = prosody.jid("bot")
        assert (await alice.ask(bot_jid, "ps", timeout=10)).startswith("#1 waits waiting - approve pending")
        assert " is carol, verified by " in await alice.ask(bot_jid, "whoami")
        mallory = await xmpp_human("mallory")
        assert (await mallory.ask(bot_jid, "cancel 1")).startswith("not authorised")
        assert (await alice.ask(bot_jid, "cancel 1")) == "cancelled #1 (re: cancel 1)"

        [shown] = await ask_irc(carol, "!ps all")
        assert shown.startswith("#1 waits cancelled"), shown
        history = [line.split(" ", 2)[2] for line in bot.ask("history 1")]
        assert history[0] == "process launched by carol via irc:testirc: project='Project', ticket=7"
        assert "process cancelled by carol via xmpp:testxmpp" in history
    finally:
        code = bot.stop()
    assert code == 0
    log = "\n".join(bot.log)
    # The refusals were logged with who tried; the DEBUG log holds no secret in any form.
    assert "refused 'launch waits' from irc:testirc:carol" in log
    assert "refused 'cancel 1' from xmpp:testxmpp:mallory@localhost/test" in log
    assert "refused 'launch waits' from dave via irc:testirc" in log
    for user, password in ((IRC_BOT[0], IRC_BOT[1]), ("bot", "botpw")):
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        for secret in (password, plain, base64.b64encode(password.encode()).decode()):
            assert secret not in log, "a secret reached the log"
    # Nor the SASL exchanges themselves (SCRAM here; with PLAIN they would carry the password).
    assert "xmpp-sasl" not in log and "AUTHENTICATE" not in log
    assert "DEBUG bot.transports.irc" in log                # DEBUG was really on


@pytest.mark.servers
def test_refused_credentials_stop_the_bot_with_one_line(tmp_path: Path, prosody: Prosody) -> None:
    home = make_home(tmp_path, {"waits": WAITS}, bot_extra=textwrap.dedent(f"""
        networks:
          - protocol: xmpp
            name: testxmpp
            jid: bot@localhost
            password_env: E2E_XMPP_PW
            host: 127.0.0.1
            port: {prosody.port}
            tls: plaintext
    """))
    run = subprocess.run([sys.executable, str(ROOT / "run_bot.py"), "--conf", str(home / "conf")],
                         env={**os.environ, "E2E_XMPP_PW": "wrong-password-1"}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("refusing to start: ") and "authentication as bot@localhost failed" in last, run.stderr
    assert "Traceback" not in run.stderr
    assert "wrong-password-1" not in run.stderr



GREET = """
    name: greet
    launch_roles: [admins]
    inputs: {who: str, n: int}
    steps:
      - participant: echo
        params: {text: "hello {{ who }}"}
"""
FORGED = "2026-12-06 15:00:00,000 CRITICAL bot.access: FORGED admin granted to mallory"


@pytest.mark.servers
async def test_hostile_input_on_real_networks_gets_a_reply_and_forges_no_log_record(
        tmp_path: Path, accounts: InspircdAnope, prosody: Prosody, irc_humans: Any, xmpp_human: Any) -> None:
    """The chat-faults review's inputs, sent as a person would: a superscript digit as an id and a
    5,000-digit value (once 'internal error' and a traceback), and field values carrying ESC and
    BEL (IRC lines may hold them) or a newline and CR (an XMPP body may), which once wrote a
    forged CRITICAL record into the log."""
    home = make_home(tmp_path, {"greet": GREET}, bot_extra=networks(accounts, prosody), users=USERS)
    bot = Bot(home).start(env=ENV)
    try:
        carol = await irc_humans("carol_on_irc", sasl=CAROL)
        await until_the_bot_answers(carol)
        for command in ("!show ²", "!history ²", "!cancel ²"):
            [answer] = await ask_irc(carol, command)
            assert answer.startswith("bad instance id"), answer
        [launched] = await ask_irc(carol, "!launch greet 'who=x\x1b[2J\x07'")
        assert launched.startswith("launched greet as #1 (re: launch greet ")

        alice = await xmpp_human("alice")
        bot_jid = prosody.jid("bot")
        huge = await alice.ask(bot_jid, "launch greet n=" + "9" * 5000, timeout=10)
        assert huge.startswith("n: ") and "is too large a number" in huge, huge[:120]
        assert (await alice.ask(bot_jid, f"launch greet 'who=x\n{FORGED}\r'")).startswith("launched greet as #2 (re: ")
        assert (await alice.ask(bot_jid, "show ²")).startswith("bad instance id")
        [line] = bot.ask("history 2")[2:3]
        assert "FORGED" in line
    finally:
        assert bot.stop() == 0
    log = (home / "var" / "bot.log").read_text(encoding="utf-8")
    assert "internal error" not in log and "Traceback" not in log
    assert "FORGED admin granted" in log                          # it was logged, as one escaped record
    for raw in ("\x1b", "\x07", "\r"):
        assert raw not in log, f"raw {raw!r} reached the log"
    assert not [line for line in log.splitlines() if line.startswith(FORGED[:23])], "a forged record"
    assert not [line for line in bot.stderr if line.startswith(FORGED[:23])]
