"""Email as a front-end in the deployed bot (real ``run_bot.py``): mail in
through its SMTP listener (a real SMTP client, stdlib smtplib) or a real
Dovecot mailbox (IMAP IDLE), replies out through the outbox to a real SMTP
server (aiosmtpd).  Who sent a mail is decided only by a single-use reply
address or a trusted Authentication-Results; everything else is refused,
told at most once to a known user, never to a stranger."""
from __future__ import annotations

import smtplib
import threading
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from tests.botproc import Bot, make_home
from tests.serverkit import free_port
from tests.serverkit.dovecot import Dovecot
from tests.serverkit.smtp import SmtpSink

WAITS = """
name: waits
project: Project
launch_roles: [release-managers]
inputs: {n: int}
steps:
  - participant: hold
"""
VOTE = """
name: vote
project: Project
steps:
  - participant: ask
    timers: "2d: expire"
    params:
      question: "Ship it?"
      to: [alice, bob]
"""
USERS = """
users:
  admin:
    roles:
      "*": [admins]
  alice:
    email: [alice@example.org]
    roles:
      "Project": [release-managers]
  bob:
    email: [bob@example.org]
    roles:
      "Project": [release-managers]
"""
AUTHRES = "mx.example.org; dkim=pass header.d=example.org; dmarc=pass header.from=example.org"


def home(tmp_path: Path, sink: SmtpSink, mail_in: str) -> Path:
    return make_home(tmp_path, {"waits": WAITS, "vote": VOTE}, users=USERS, bot_extra=f"""
        log_level: DEBUG
        outbox: {{retry_min: 0.2s, retry_max: 1s}}
        commands:
          rate_limit: {{commands: 100, per: 10s}}   # the IMAP test mails 30 commands at once
        networks:
          - protocol: email
            name: mail
            smtp_host: 127.0.0.1
            smtp_port: {sink.port}
            security: plaintext
            from: "Release Bot <bot@example.test>"
            idle_timeout: 1s
            trust: {{authserv_id: mx.example.org, domains: [example.org]}}
{mail_in}
    """)


def mail(sender: str, subject: str, body: str = "", *, to: str = "bot@example.test", authres: str | None = None,
         headers: dict[str, str] | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.org")
    if authres:
        msg["Authentication-Results"] = authres
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body or "\n")
    return msg


def wait_until(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def to(sink: SmtpSink, address: str) -> list[Any]:
    return [r for r in list(sink.received) if address in r.rcpt_tos]


@pytest.fixture
def listener_bot(tmp_path: Path, smtp_sinks: Any) -> Any:
    sink = smtp_sinks()
    port = free_port()
    bot = Bot(home(tmp_path, sink, f"""
            listen: {{host: 127.0.0.1, port: {port}, addresses: [bot@example.test]}}""")).start()

    def send(msg: EmailMessage, envelope_from: str | None = None) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.send_message(msg, from_addr=envelope_from if envelope_from is not None else msg["From"])
    yield bot, sink, send
    assert bot.stop() == 0


def test_commands_by_mail_verified_by_domain_then_by_reply_address(listener_bot: Any) -> None:
    bot, sink, send = listener_bot
    first = mail("Alice <alice@example.org>", "whoami", authres=AUTHRES)
    send(first)
    [reply] = wait_until(lambda: to(sink, "alice@example.org"))
    text = reply.message.get_content()
    assert "alice@example.org on mail is alice, verified by sender's domain" in text, text
    assert reply.message["In-Reply-To"] == first["Message-ID"]
    token_address = str(reply.message["Reply-To"])
    assert token_address.startswith("bot+") and token_address.endswith("@example.test")
    # a reply to the single-use address, with no Authentication-Results at all: alice, by her mailbox
    second = mail("alice@example.org", "Re: about my last mail", "launch waits n=7\n\nOn Mon, Bot wrote:\n> whoami\n",
                  to=token_address)
    send(second)
    wait_until(lambda: len(to(sink, "alice@example.org")) == 2)
    launched = to(sink, "alice@example.org")[1]
    assert launched.message.get_content().strip() == "launched waits as #1 (re: launch waits n=7)"
    assert launched.message["In-Reply-To"] == second["Message-ID"]
    assert bot.statuses() == {1: "waiting"}
    history = bot.ask("history 1")
    assert "launched by alice via email:mail" in history[0]
    # the same mail again (same Message-ID): one mail, one effect
    send(second)
    time.sleep(0.5)
    assert bot.statuses() == {1: "waiting"} and len(to(sink, "alice@example.org")) == 2


def test_forged_and_foreign_mail_is_refused_and_told_only_to_a_known_user(listener_bot: Any) -> None:
    bot, sink, send = listener_bot
    send(mail("alice@example.org", "launch waits n=1"))                        # no proof at all
    send(mail("alice@example.org", "launch waits n=2", authres="evil.test; dmarc=pass header.from=example.org"))
    send(mail("mallory@evil.test", "launch waits n=3", authres=AUTHRES))       # a stranger
    send(mail('"alice@example.org" <mallory@evil.test>', "launch waits n=4"))  # display-name trick
    send(mail("MAILER-DAEMON@example.org", "Undelivered Mail", "launch waits n=5"), envelope_from="")
    send(mail("alice@example.org", "Out of office", "launch waits n=6", authres=AUTHRES,
              headers={"Auto-Submitted": "auto-replied"}))
    lower = mail("alice@example.org", "launch waits n=8", authres="relay.example.net; none")
    del lower["Authentication-Results"]
    lower["Authentication-Results"] = "relay.example.net; none"
    lower["Received"] = "from relay.example.net by mx.example.org"
    lower["Authentication-Results"] = AUTHRES           # below another header: not the topmost
    send(lower)
    time.sleep(1.5)
    assert bot.statuses() == {}
    told = to(sink, "alice@example.org")
    assert len(told) == 3, [r.message.get_content() for r in told]        # n=1, n=2, n=8: one reply each
    assert all(r.message.get_content().startswith("Your mail was not acted on: ") for r in told)
    assert not to(sink, "mallory@evil.test") and len(sink.received) == 3


def test_a_question_answered_by_mail_and_its_address_spent(listener_bot: Any) -> None:
    bot, sink, send = listener_bot
    assert bot.ask("launch vote") == ["launched vote as #1"]
    [to_alice] = wait_until(lambda: to(sink, "alice@example.org"))
    [to_bob] = wait_until(lambda: to(sink, "bob@example.org"))
    alice_addr, bob_addr = str(to_alice.message["Reply-To"]), str(to_bob.message["Reply-To"])
    assert alice_addr != bob_addr and "Ship it?" in to_alice.message["Subject"]
    # bob's domain alone cannot answer; nor can he use alice's address
    send(mail("bob@example.org", "approve q1", authres=AUTHRES))
    send(mail("bob@example.org", "Re: Ship it?", "approve", to=alice_addr))
    wait_until(lambda: len(to(sink, "bob@example.org")) == 3)
    refusals = [r.message.get_content() for r in to(sink, "bob@example.org")[1:]]
    assert any("cannot answer a question" in t for t in refusals), refusals
    assert any("not acted on" in t for t in refusals), refusals
    assert bot.statuses() == {1: "waiting"}
    # alice answers by replying to her own address: first line the choice, the rest the comment
    send(mail("alice@example.org", "Re: Ship it?", "approve\nlooks good to me\n\n-- \nAlice\n", to=alice_addr))
    wait_until(lambda: bot.statuses() == {1: "completed"})
    fields = bot.ask("show 1")
    assert any("answer='approve'" in line for line in fields), fields
    assert any("'comment': 'looks good to me'" in line and "single-use reply address" in line
               for line in fields), fields
    # the same address again (another mail): spent
    before = len(to(sink, "alice@example.org"))
    send(mail("alice@example.org", "Re: Ship it?", "reject", to=alice_addr))
    wait_until(lambda: any("already answered" in r.message.get_content() for r in to(sink, "alice@example.org")[before:]))
    texts = [r.message.get_content() for r in to(sink, "alice@example.org")]
    assert any("not acted on: question already answered through this reply address" in t for t in texts), texts


@pytest.mark.slow
def test_imap_mail_while_down_and_a_sigkill_mid_way_run_each_command_once(tmp_path: Path, smtp_sinks: Any,
                                                                           dovecot: Dovecot) -> None:
    sink = smtp_sinks()
    conf = home(tmp_path, sink, f"""
            imap: {{host: 127.0.0.1, port: {dovecot.port}, tls: false, user: bot@example.test,
                    password_env: E2E_IMAP_PW, poll_interval: 5s}}""")
    env = {"E2E_IMAP_PW": "botpw"}
    for n in range(5):                                  # arrives while the bot is not running
        dovecot.deliver(mail("alice@example.org", f"launch waits n={n}", authres=AUTHRES).as_bytes())
    bot = Bot(conf).start(env=env)
    wait_until(lambda: len(bot.statuses()) == 5)
    def stream() -> None:       # mail keeps arriving while the bot is killed and restarted
        for n in range(5, 30):
            dovecot.deliver(mail("alice@example.org", f"launch waits n={n}", authres=AUTHRES).as_bytes())
            time.sleep(0.03)
    feeder = threading.Thread(target=stream)
    feeder.start()
    wait_until(lambda: len(bot.statuses()) >= 10)
    bot.kill()
    at_kill = len(bot.statuses())
    bot = Bot(conf).start(env=env)
    feeder.join()
    assert at_kill < 30, "everything was done before the kill: nothing tested"
    try:
        wait_until(lambda: len(bot.statuses()) >= 30, timeout=30)
        time.sleep(1.0)
        with bot.db() as db:
            ns = sorted(int(r[0]) for r in db.execute("SELECT json_extract(fields, '$.n') FROM instances"))
            pending = db.execute("SELECT COUNT(*) FROM email_inbox WHERE handled = 0").fetchone()[0]
        assert ns == list(range(30)) and pending == 0
    finally:
        assert bot.stop() == 0


def test_mail_over_the_rate_waits_its_turn_and_a_users_message_id_in_our_domain_is_not_ours(
        tmp_path: Path, smtp_sinks: Any) -> None:
    sink = smtp_sinks()
    port = free_port()
    conf = home(tmp_path, sink, f"""
            listen: {{host: 127.0.0.1, port: {port}, addresses: [bot@example.test]}}""")
    text = (conf / "conf" / "bot.yaml").read_text().replace("rate_limit: {commands: 100, per: 10s}",
                                                             "rate_limit: {commands: 3, per: 2s}")
    (conf / "conf" / "bot.yaml").write_text(text)
    bot = Bot(conf).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for n in range(7):
                msg = mail("alice@example.org", f"launch waits n={n}", authres=AUTHRES)
                del msg["Message-ID"]
                msg["Message-ID"] = make_msgid(domain="example.test")     # the bot's own domain
                client.send_message(msg)
        time.sleep(1.0)
        assert len(bot.statuses()) == 3                    # the rest wait their turn ...
        wait_until(lambda: len(bot.statuses()) == 7, timeout=15)   # ... and none is dropped
    finally:
        assert bot.stop() == 0
