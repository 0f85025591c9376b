"""Approvals in the deployed bot (real ``run_bot.py``) across real networks:
a 2-of-3 question asked on IRC (InspIRCd + Anope: services accounts), XMPP
(prosody) and mail (the bot's SMTP listener in, aiosmtpd out), answered from
each, with impostors refused, and the bot SIGKILLed while the question is
pending and again right after an answer: exactly one outcome."""
from __future__ import annotations

import asyncio
import smtplib
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from tests.botproc import Bot, make_home
from tests.serverkit import free_port
from tests.serverkit.smtp import SmtpSink
from tests.servers.irc import Human as IrcHuman
from tests.servers.irc import InspircdAnope
from tests.servers.xmpp import Prosody
from tests.test_bot_on_networks import CHANNEL, ENV, IRC_BOT, NICK, until_the_bot_answers

ANNA = ("anna", "anna-pw-9")
RELEASE = """
name: release
project: Project
launch_roles: [dev]
steps:
  - id: approve
    participant: ask
    timers: "2d: expire"
    params:
      question: "Release 2.0?"
      to: ["role:rm"]
      quorum: 2
  - participant: hold
"""
USERS = """
users:
  admin:
    roles:
      "*": [admins]
  anna:                       # IRC, by services account
    irc:
      testirc: {accounts: [anna]}
    roles:
      "Project": [rm]
  xena:                       # XMPP
    xmpp: [alice@localhost]
    roles:
      "Project": [rm]
  mike:                       # mail
    email: [mike@example.org]
    roles:
      "Project": [rm]
"""


def config(insp: InspircdAnope, prosody: Prosody, sink: SmtpSink, listen_port: int) -> str:
    return f"""
        log_level: DEBUG
        outbox: {{retry_min: 0.2s, retry_max: 1s}}
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
            password_env: E2E_XMPP_PW
            host: 127.0.0.1
            port: {prosody.port}
            tls: plaintext
            nick: {NICK}
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {sink.port}
            security: plaintext
            from: bot@example.test
            listen: {{host: 127.0.0.1, port: {listen_port}, addresses: [bot@example.test]}}
    """


def mail_to(port: int, to: str, body: str, sender: str = "mike@example.org") -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, "Re: Release 2.0?"
    msg["Message-ID"] = make_msgid(domain="example.org")
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(msg)


async def wait(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


@pytest.mark.servers
@pytest.mark.slow
async def test_two_of_three_across_irc_xmpp_and_mail_with_sigkills(
        tmp_path: Path, inspircd_anope: InspircdAnope, prosody: Prosody, xmpp_human: Any, smtp_sinks: Any) -> None:
    inspircd_anope.register(IRC_BOT, ANNA)
    sink = smtp_sinks()
    port = free_port()
    home = make_home(tmp_path, {"release": RELEASE}, users=USERS,
                     bot_extra=config(inspircd_anope, prosody, sink, port))
    bot = Bot(home).start(env=ENV)
    anna = await IrcHuman.connect(inspircd_anope.helper_port, "anna_w", sasl=ANNA)
    impostor = await IrcHuman.connect(inspircd_anope.helper_port, "anna")       # her name, not her account
    xena = await xmpp_human("alice")
    try:
        await anna.join(CHANNEL)
        await impostor.join(CHANNEL)
        await until_the_bot_answers(anna)
        assert bot.ask("launch release") == ["launched release as #1"]
        # asked on every network each addressee has
        asked_irc = await anna.expect(lambda m: m.command == "PRIVMSG" and m.params[0] == "anna_w"
                                      and "q1" in m.params[-1], timeout=15)
        assert "approve q1 [comment] | reject q1 [reason]" in asked_irc.params[-1]
        await xena.expect(lambda r: "q1 from release #1" in r.body, timeout=15)
        [asked_mail] = await wait(lambda: [r for r in list(sink.received) if "mike@example.org" in r.rcpt_tos])
        mike_address = str(asked_mail.message["Reply-To"])
        assert mike_address.startswith("bot+")
        assert not [m for m in impostor.lines if m.command == "PRIVMSG" and m.params[0] == "anna"]

        # the bot dies with the question pending; nothing is forgotten
        bot.kill()
        bot = Bot(home).start(env=ENV)
        await until_the_bot_answers(anna)

        # the impostor holding anna's nick cannot answer; anna can, privately, verified by her account
        impostor.send(f"PRIVMSG {NICK} :approve q1")
        refusal = await impostor.expect(lambda m: m.command in ("PRIVMSG", "NOTICE") and m.params[0] == "anna",
                                        timeout=15)
        assert "not authorised" in refusal.params[-1]
        anna.send(f"PRIVMSG {NICK} :approve q1 ship it")
        recorded = await anna.expect(lambda m: m.params[0] == "anna_w" and "recorded your approve" in m.params[-1],
                                     timeout=15)
        assert "1 approve of 2 needed" in recorded.params[-1]

        # mike answers by mail and the bot is killed at once: one outcome either way
        mail_to(port, mike_address, "approve\nfine by me\n")
        bot.kill()
        bot = Bot(home).start(env=ENV)
        await wait(lambda: bot.statuses() == {1: "waiting"} and any(
            "answer='approve'" in line for line in bot.ask("show 1")), timeout=30)
        # the third answer comes after the end: told so, nothing changes
        reply = await xena.ask(f"bot@localhost", "approve q1")
        assert reply == "q1 is already decided: approve"
        history = bot.ask("history 1")
        assert sum("question decided" in line for line in history) == 1, history
        answered = [line for line in history if "question answered" in line]
        assert len(answered) == 2 and "anna approve via irc:testirc (services account)" in answered[0], answered
        assert "mike approve via email:mail (single-use reply address)" in answered[1], answered
        # every answerer is told the outcome
        await anna.expect(lambda m: m.params[0] == "anna_w" and "q1 decided: approve" in m.params[-1], timeout=15)
        await wait(lambda: any("q1 decided: approve" in r.message.get_content() for r in list(sink.received)
                               if "mike@example.org" in r.rcpt_tos))
    finally:
        await anna.close()
        await impostor.close()
        assert bot.stop() == 0
