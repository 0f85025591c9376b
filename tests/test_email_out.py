"""Mail out: the ``protocol: email`` network against a real aiosmtpd on
127.0.0.1 (``tests/serverkit/smtp``), plain, with STARTTLS and AUTH, and with
TLS from the first byte; and its bot.yaml entry, problems at file:line."""
from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import textwrap
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable

import pytest

from bot.chat import Identity, NotDelivered, Outgoing, Person, Room, TransportError, Undeliverable
from bot.config import load_config
from bot.transports import FRONT_ENDS, front_end
from bot.transports.email import EmailConfig, EmailTransport, parse_config
from engine.configkit import Findings, Section
from engine.participants import ParticipantRegistry
from engine.yamlconfig import ConfigError, loads_yaml
from participants import discover
from tests.serverkit.smtp import SmtpSink
from tests.serverkit.tls import ServerCert, ThrowawayCA

pytestmark = pytest.mark.servers
ROOT = Path(__file__).resolve().parent.parent
PASSWORD_ENV = "RELEASEBOT_TEST_SMTP_PW"
SECRET = "s3cret-smtp-pw"


# -- helpers ------------------------------------------------------------------------------------

def parse_with_warnings(text: str, file: str = "bot.yaml", *,
                        need_secrets: bool = True) -> tuple[EmailConfig | None, list[str], list[str]]:
    """As bot.config does it: (config or None, problems, warnings), each as file:line: message."""
    node = loads_yaml(textwrap.dedent(text), file)["networks"][0]
    del node["protocol"]
    findings = Findings(need_secrets=need_secrets)
    label = f"email network {node['name']!r}" if isinstance(node.get("name"), str) else "email network"
    cfg = parse_config(Section(node, file, findings, label=label))
    return cfg, [str(p) for p in findings.problems], [str(w) for w in findings.warnings]


def parse(text: str, file: str = "bot.yaml") -> tuple[EmailConfig | None, list[str]]:
    cfg, problems, _ = parse_with_warnings(text, file)
    return cfg, problems


def config_for(sink: SmtpSink, extra: str = "", *, security: str = "plaintext") -> EmailConfig:
    text = f"""\
        networks:
          - protocol: email
            name: mail
            smtp_host: "127.0.0.1"
            smtp_port: {sink.port}
            security: {security}
            from: "Release Bot <bot@example.test>"
            helo: bot.example.test
            timeout: 5s
""" + textwrap.indent(textwrap.dedent(extra), " " * 12)
    cfg, problems = parse(text)
    assert problems == [] and cfg is not None
    return cfg


async def started(cfg: EmailConfig) -> EmailTransport:
    transport = EmailTransport(cfg)

    async def on_message(message: Any) -> None:
        raise AssertionError("no incoming mail yet")
    await transport.start(on_message)
    return transport


def person(*addresses: str, network: str = "mail") -> Person:
    return Person(protocol="email", network=network, user="alice", accounts=addresses)


def content(received: Any) -> str:
    """The body as the receiver reads it (line ends as text, not as sent)."""
    return str(received.message.get_content()).replace("\r\n", "\n")


async def outcome(receipt: "asyncio.Future[None]") -> BaseException | None:
    try:
        await asyncio.wait_for(receipt, 10)
    except (NotDelivered, Undeliverable) as exc:
        return exc
    return None


# -- delivery -----------------------------------------------------------------------------------

async def test_a_mail_arrives_with_every_header_right_and_its_utf8_body_whole(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    assert transport.ready and transport.connections == 0            # no connection until there is mail
    body = ("Release 2.4 is out — ünïcödé ✓\n"
            ".a line starting with a dot\n"
            "From the start of a line\n"
            + "long " * 400 + "\n")
    receipt = await transport.send(person("alice@example.test", "Alice Doe <alice@other.test>"), Outgoing(
        body, subject="Release 2.4: done ✓", message_id="outbox-17.3@bot.example.test",
        in_reply_to="<req-1@example.test>", references=("<req-0@example.test>", "req-1@example.test"),
        reply_to="reply+token42@bot.example.test"))
    assert await outcome(receipt) is None
    [got] = smtp_sink.received
    mail = got.message
    assert got.mail_from == "bot@example.test"
    assert got.rcpt_tos == ("alice@example.test", "alice@other.test")
    assert mail["From"] == "Release Bot <bot@example.test>"
    assert [a.addr_spec for a in mail["To"].addresses] == ["alice@example.test", "alice@other.test"]
    assert mail["Subject"] == "Release 2.4: done ✓"
    assert mail["Message-ID"] == "<outbox-17.3@bot.example.test>"
    assert mail["In-Reply-To"] == "<req-1@example.test>"
    assert mail["References"] == "<req-0@example.test> <req-1@example.test>"
    assert mail["Reply-To"] == "reply+token42@bot.example.test"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert abs(parsedate_to_datetime(mail["Date"]).timestamp() - time.time()) < 60
    assert mail.get_content_charset() == "utf-8"
    assert content(got) == body
    assert max(len(line) for line in got.raw.split(b"\r\n")) <= 998    # folded, as SMTP requires
    assert got.raw.isascii()                                             # needs no 8BITMIME
    await transport.close()
    assert not transport.ready


async def test_a_plain_text_gets_its_first_line_as_subject_and_a_message_id_of_the_from_domain(
        smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    assert await outcome(await transport.send(person("bob@example.test"), "\n  build 812   failed\nlog: ...")) is None
    [got] = smtp_sink.received
    assert got.message["Subject"] == "build 812 failed"
    assert got.message["Message-ID"].endswith("@example.test>")
    assert got.message["In-Reply-To"] is None and got.message["Reply-To"] is None
    await transport.close()


async def test_an_enormous_body_is_sent_whole(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    body = "".join(f"line {i}: {'x' * (i % 300)} é\n" for i in range(20_000)) + "y" * 200_000 + "\n"
    assert len(body) > 3_000_000
    assert await outcome(await transport.send(person("bob@example.test"), Outgoing(body, subject="big"))) is None
    assert content(smtp_sink.received[0]) == body
    await transport.close()


async def test_newlines_cannot_inject_headers_or_recipients(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    receipt = await transport.send(person("bob@example.test"),
                                   Outgoing("body", subject="hi\r\nBcc: evil@example.test\nX-Evil: 1"))
    assert await outcome(receipt) is None
    [got] = smtp_sink.received
    assert got.rcpt_tos == ("bob@example.test",)
    assert got.message["Bcc"] is None and got.message["X-Evil"] is None
    assert got.message["Subject"] == "hi Bcc: evil@example.test X-Evil: 1"
    # an address or an id with a newline is refused before any connection
    for target, message in [(person("bob@example.test\r\nRCPT TO:<evil@example.test>"), Outgoing("x")),
                            (person("bob@example.test"), Outgoing("x", reply_to="a@b.test\nBcc: evil@example.test")),
                            (person("bob@example.test"), Outgoing("x", message_id="<a@b>\r\nBcc: evil@x.test")),
                            (person("bob@example.test"), Outgoing("x", references=("<a@b> <c@d>",))),
                            (person("not an address"), Outgoing("x")),
                            (person(), Outgoing("x"))]:
        failure = await outcome(await transport.send(target, message))
        assert isinstance(failure, Undeliverable), (target, message)
        assert str(failure).startswith("email mail: ")
    assert len(smtp_sink.received) == 1 and smtp_sink.connections == 1
    await transport.close()


async def test_only_a_person_on_this_network_can_be_mailed(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    for target in (Room("email", "mail", "ops@example.test"),
                   Identity("email", "mail", "alice@example.test", account="alice@example.test"),
                   person("alice@example.test", network="othermail"),
                   Person("xmpp", "mail", "alice", ("alice@example.test",))):
        with pytest.raises(TransportError) as err:
            await transport.send(target, "hello")     # type: ignore[arg-type]
        assert not isinstance(err.value, (NotDelivered, Undeliverable))
    assert smtp_sink.connections == 0
    await transport.close()


# -- one connection for a batch -------------------------------------------------------------------

async def test_a_batch_goes_over_one_connection_that_closes_when_idle(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink, "idle_timeout: 0.3s"))
    receipts = [await transport.send(person("bob@example.test"), f"message {i}") for i in range(40)]
    assert [await outcome(r) for r in receipts] == [None] * 40
    assert smtp_sink.connections == 1 and transport.connections == 1
    assert [r.message["Subject"] for r in smtp_sink.received] == [f"message {i}" for i in range(40)]
    assert {r.connection for r in smtp_sink.received} == {1}
    deadline = time.monotonic() + 5
    while smtp_sink._live and time.monotonic() < deadline:          # QUIT after 0.3 s idle
        await asyncio.sleep(0.05)
    assert not smtp_sink._live
    assert await outcome(await transport.send(person("bob@example.test"), "later")) is None
    assert smtp_sink.connections == 2 and smtp_sink.received[-1].connection == 2
    await transport.close()


# -- the server's answers ------------------------------------------------------------------------------

async def test_a_refused_recipient_is_undeliverable_with_the_server_text_and_the_next_mail_goes(
        smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    failure = await outcome(await transport.send(person("bob@example.test", "ghost@refused.test"), "hi"))
    assert isinstance(failure, Undeliverable)
    assert "<ghost@refused.test>: 550 5.1.1 no such user" in str(failure)
    # all or nothing: bob did not get it either, so a retry can never repeat it for him
    assert smtp_sink.received == []
    failure = await outcome(await transport.send(person("carol@busy.test"), "hi"))
    assert isinstance(failure, NotDelivered) and not isinstance(failure, Undeliverable)
    assert "451 4.3.0 mailbox busy" in str(failure)
    failure = await outcome(await transport.send(person("ghost@refused.test", "carol@busy.test"), "hi"))
    assert isinstance(failure, NotDelivered)                 # one "try later" makes it all wait
    assert await outcome(await transport.send(person("bob@example.test"), "next")) is None
    assert [r.rcpt_tos for r in smtp_sink.received] == [("bob@example.test",)]
    assert smtp_sink.connections == 1                        # RSET, not a new connection
    await transport.close()


@pytest.mark.parametrize("stage, reply, kind", [
    ("mail_reply", "451 4.3.2 not accepting mail right now", NotDelivered),
    ("mail_reply", "553 5.7.1 sender not allowed", Undeliverable),
    ("data_reply", "452 4.3.1 insufficient storage", NotDelivered),
    ("data_reply", "554 5.6.0 message rejected as spam", Undeliverable),
])
async def test_answers_to_mail_and_data_settle_the_receipt(
        smtp_sink: SmtpSink, stage: str, reply: str, kind: type) -> None:
    transport = await started(config_for(smtp_sink))
    setattr(smtp_sink, stage, reply)
    failure = await outcome(await transport.send(person("bob@example.test"), "hi"))
    assert type(failure) is kind
    assert reply in str(failure)
    assert ("MAIL FROM" if stage == "mail_reply" else "DATA") in str(failure)
    setattr(smtp_sink, stage, None)
    assert await outcome(await transport.send(person("bob@example.test"), "again")) is None
    assert smtp_sink.connections == 1
    await transport.close()


async def test_a_server_that_is_down_is_not_delivered_to_and_after_its_restart_mail_goes(
        smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture) -> None:
    transport = await started(config_for(smtp_sink))
    assert await outcome(await transport.send(person("bob@example.test"), "before")) is None
    smtp_sink.stop()
    with caplog.at_level(logging.DEBUG, logger="bot.transports.email"):
        receipts = [await transport.send(person("bob@example.test"), f"while down {i}") for i in range(5)]
        failures = [await outcome(r) for r in receipts]
        assert all(type(f) is NotDelivered for f in failures), failures
        assert "cannot connect to 127.0.0.1" in str(failures[0])
        failure = await outcome(await transport.send(person("bob@example.test"), "still down"))
        assert type(failure) is NotDelivered
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1                       # the outage is logged once, not per message
    assert transport.ready                          # the outbox keeps retrying
    smtp_sink.start()
    assert await outcome(await transport.send(person("bob@example.test"), "after")) is None
    assert [r.message["Subject"] for r in smtp_sink.received] == ["before", "after"]
    await transport.close()


async def test_a_server_restarted_while_the_connection_idles_costs_no_message(smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink, "idle_timeout: 30s"))
    assert await outcome(await transport.send(person("bob@example.test"), "one")) is None
    smtp_sink.restart()                             # drops the idle connection
    assert await outcome(await transport.send(person("bob@example.test"), "two")) is None
    assert [r.connection for r in smtp_sink.received] == [1, 2]
    await transport.close()


async def test_close_fails_the_receipts_still_open_with_not_delivered(smtp_sinks: Callable[..., SmtpSink]) -> None:
    sink = smtp_sinks(data_delay=2.0)
    transport = await started(config_for(sink))
    receipts = [await transport.send(person("bob@example.test"), f"m{i}") for i in range(3)]
    await asyncio.sleep(0.1)
    await transport.close(flush_timeout=0.2)
    failures = [await outcome(r) for r in receipts]
    assert all(type(f) is NotDelivered for f in failures), failures
    failure = await outcome(await transport.send(person("bob@example.test"), "after close"))
    assert type(failure) is NotDelivered


# -- TLS and AUTH -------------------------------------------------------------------------------------

async def test_starttls_with_the_throwaway_ca_and_auth(
        smtp_sinks: Callable[..., SmtpSink], smtp_cert: ServerCert, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    sink = smtp_sinks(security="starttls", cert=smtp_cert, users={"bot": SECRET})
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    cfg = config_for(sink, f"user: bot\npassword_env: {PASSWORD_ENV}\nca_file: {smtp_cert.ca_file}\n",
                     security="starttls")
    assert SECRET not in repr(cfg)
    with caplog.at_level(logging.DEBUG):
        transport = await started(cfg)
        receipts = [await transport.send(person("bob@example.test"), f"over TLS {i}") for i in range(3)]
        assert [await outcome(r) for r in receipts] == [None] * 3
        await transport.close()
    assert [(r.tls, r.login, r.connection) for r in sink.received] == [(True, "bot", 1)] * 3
    assert sink.logins == [("bot", True)]
    assert SECRET not in caplog.text


async def test_a_refused_login_keeps_the_mail_and_holds_off_logged_once(
        smtp_sinks: Callable[..., SmtpSink], smtp_cert: ServerCert, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    sink = smtp_sinks(security="starttls", cert=smtp_cert, users={"bot": SECRET})
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password")
    cfg = config_for(sink, f"user: bot\npassword_env: {PASSWORD_ENV}\nca_file: {smtp_cert.ca_file}\n",
                     security="starttls")
    with caplog.at_level(logging.DEBUG, logger="bot.transports.email"):
        transport = await started(cfg)
        receipts = [await transport.send(person("bob@example.test"), f"m{i}") for i in range(3)]
        failures = [await outcome(r) for r in receipts]
        # NotDelivered, not Undeliverable: the mail is fine, the credentials are not; once fixed, it goes
        assert all(type(f) is NotDelivered for f in failures), failures
        assert "refused the login as 'bot': 535" in str(failures[0])
        assert not transport.ready                    # the outbox waits instead of hammering the login
        failure = await outcome(await transport.send(person("bob@example.test"), "during the hold"))
        assert type(failure) is NotDelivered
        await transport.close()
    assert sink.logins == [("bot", False)] and sink.connections == 1     # one attempt, no lock-out
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "fix user or password_env" in errors[0].getMessage()
    assert "wrong-password" not in caplog.text and sink.received == []


async def test_tls_from_the_first_byte_and_an_untrusted_certificate(
        smtp_sinks: Callable[..., SmtpSink], smtp_cert: ServerCert) -> None:
    sink = smtp_sinks(security="tls", cert=smtp_cert)
    transport = await started(config_for(sink, f"ca_file: {smtp_cert.ca_file}\n", security="tls"))
    assert await outcome(await transport.send(person("bob@example.test"), "tls")) is None
    assert sink.received[0].tls
    await transport.close()
    transport = await started(config_for(sink, security="tls"))      # the system CAs do not know it
    failure = await outcome(await transport.send(person("bob@example.test"), "untrusted"))
    assert type(failure) is NotDelivered and "certificate is not trusted" in str(failure)
    assert len(sink.received) == 1
    await transport.close()


async def test_starttls_required_but_not_offered_sends_nothing(smtp_sink: SmtpSink, tls_ca: ThrowawayCA) -> None:
    transport = await started(config_for(smtp_sink, f"ca_file: {tls_ca.ca_file}\n", security="starttls"))
    failure = await outcome(await transport.send(person("bob@example.test"), "secret plans"))
    assert type(failure) is NotDelivered and "STARTTLS" in str(failure)
    assert smtp_sink.received == []
    await transport.close()


# -- configuration -------------------------------------------------------------------------------------

GOOD = """\
networks:
  - protocol: email
    name: mail
    smtp_host: smtp.example.org
    from: releasebot@example.org
"""


def test_defaults_and_ports_by_security() -> None:
    cfg, problems = parse(GOOD)
    assert problems == [] and cfg is not None
    assert (cfg.security, cfg.port, cfg.user, cfg.password, cfg.timeout) == ("starttls", 587, None, None, 30.0)
    assert cfg.sender.addr_spec == "releasebot@example.org"
    cfg, _ = parse(GOOD + "    security: tls\n")
    assert cfg is not None and cfg.port == 465
    cfg, _ = parse(GOOD + "    security: tls\n    smtp_port: 2465\n")
    assert cfg is not None and cfg.port == 2465
    assert "email" in FRONT_ENDS and front_end("email").Transport is EmailTransport


def test_problems_are_reported_at_their_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    cfg, problems = parse("""\
        networks:
          - protocol: email
            name: mail
            smtp_host: smtp.example.org
            from: "releasebot@example.org\\nBcc: x@y.test"
            security: ssl
            smtp_port: 70000
            user: bot
            password_env: RELEASEBOT_TEST_SMTP_PW
            timeout: 0.5s
            colour: blue
            helo: "bad name"
        """, "conf/bot.yaml")
    assert cfg is None
    assert problems == [
        "conf/bot.yaml:11: email network 'mail': unknown key 'colour' (expected name, smtp_host, smtp_port, "
        "security, user, password_env, from, ca_file, timeout, helo, idle_timeout, reply_address, token_lifetime, imap, listen, trust)",
        "conf/bot.yaml:7: email network 'mail': smtp_port: expected 1..65535",
        "conf/bot.yaml:6: email network 'mail': security: expected one of starttls, tls, plaintext",
        "conf/bot.yaml:5: email network 'mail': from: contains control characters (a newline, a tab, ...)",
        "conf/bot.yaml:12: email network 'mail': helo: expected a host name like mail.example.org "
        "(or an address literal like [192.0.2.1])",
        "conf/bot.yaml:10: email network 'mail': timeout: at least 1s (how long to wait for the server; "
        "less fails healthy servers under load)",
        "conf/bot.yaml:9: email network 'mail': password_env: environment variable RELEASEBOT_TEST_SMTP_PW "
        "is not set (or empty)",
    ]


def test_missing_keys_a_literal_password_and_a_login_half_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    cfg, problems = parse("""\
        networks:
          - protocol: email
            password: hunter2
            user: bot
        """)
    assert cfg is None
    assert "bot.yaml:3: email network: password: secrets are not written in config files; put it in an " \
           "environment variable and name it with password_env" in problems
    for key in ("name", "smtp_host", "from"):
        assert f"bot.yaml:2: email network: missing {key!r}" in problems
    assert "bot.yaml:4: email network: user: needs password_env (the variable holding the password)" in problems
    assert not any("hunter2" in p for p in problems)
    _, problems = parse(GOOD + f"    password_env: {PASSWORD_ENV}\n")
    assert problems == ["bot.yaml:6: email network 'mail': password_env: needs user (who logs in with that password)"]
    _, problems = parse(GOOD.replace("releasebot@example.org", "releasebot"))
    assert problems == ["bot.yaml:5: email network 'mail': from: expected one address like name@example.org"]


@pytest.mark.parametrize("host, refused", [
    ("smtp.example.org", True), ("10.1.2.3", True), ("127.0.0.1", False), ("localhost", False), ("::1", False)])
def test_plaintext_only_to_a_loopback_host(host: str, refused: bool) -> None:
    cfg, problems = parse(GOOD.replace("smtp.example.org", f'"{host}"') + "    security: plaintext\n")
    if refused:
        assert cfg is None
        assert problems == [f"bot.yaml:6: email network 'mail': security: plaintext is only allowed to a loopback "
                            f"host (localhost, 127.0.0.1, ::1), not {host!r}: mail and password would cross the "
                            "network unencrypted"]
    else:
        assert problems == [] and cfg is not None and cfg.port == 25


def test_ca_file_must_exist_and_needs_tls(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg, problems = parse(GOOD + f"    ca_file: {bundle}\n")
    assert problems == [] and cfg is not None and cfg.ca_file == str(bundle)
    _, problems = parse(GOOD + f"    ca_file: {tmp_path / 'missing.pem'}\n")
    assert problems == ["bot.yaml:6: email network 'mail': ca_file: no such file"]
    _, problems = parse(GOOD.replace("smtp.example.org", "localhost")
                        + f"    ca_file: {bundle}\n    security: plaintext\n")
    assert problems == ["bot.yaml:6: email network 'mail': ca_file: needs security: starttls or tls "
                        "(a CA is only used to check a TLS server)"]


async def test_check_needs_no_password_but_starting_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    text = GOOD + f"    user: bot\n    password_env: {PASSWORD_ENV}\n"
    cfg, problems, warnings = parse_with_warnings(text, need_secrets=False)       # check
    assert problems == [] and cfg is not None and cfg.password is None
    assert warnings == [f"bot.yaml:7: email network 'mail': password_env: environment variable {PASSWORD_ENV} "
                        "is not set (or empty); the bot will refuse to start without it"]
    with pytest.raises(TransportError, match="no password"):
        await EmailTransport(cfg).start(lambda m: None)  # type: ignore[arg-type, return-value]
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    cfg, problems, warnings = parse_with_warnings(text)
    assert problems == [] == warnings and cfg is not None and cfg.password == SECRET


def test_the_bot_config_loader_checks_email_networks_at_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    text = (conf / "bot.yaml").read_text()
    assert "\nnetworks: []\n" in text
    text = text.replace("\nnetworks: []\n", "\nnetworks:\n  - protocol: email\n    name: mail\n"
                        "    smtp_host: smtp.example.org\n    from: bot@example.org\n    security: plaintext\n")
    (conf / "bot.yaml").write_text(text)
    line = text.splitlines().index("    security: plaintext") + 1
    with pytest.raises(ConfigError) as err:
        load_config(conf, ParticipantRegistry(discover()).names())
    assert any(p.startswith(f"conf/bot.yaml:{line}: email network 'mail': security: plaintext is only allowed")
               for p in str(err.value).splitlines())
    (conf / "bot.yaml").write_text(text.replace("    security: plaintext\n", ""))
    config = load_config(conf, ParticipantRegistry(discover()).names())
    [network] = config.networks
    assert isinstance(network, EmailConfig) and network.name == "mail" and network.command_prefix == "!"


async def test_a_connection_the_server_closed_at_mail_is_reopened_once_for_that_message(
        smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink, "idle_timeout: 30s"))
    assert await outcome(await transport.send(person("bob@example.test"), "one")) is None
    smtp_sink.drops["MAIL"] = 1                     # an idle timeout racing the next message
    assert await outcome(await transport.send(person("bob@example.test"), "two")) is None
    assert [r.connection for r in smtp_sink.received] == [1, 2]
    smtp_sink.drops["MAIL"] = 2                     # and again on the new connection: not a stale one
    failure = await outcome(await transport.send(person("bob@example.test"), "three"))
    assert type(failure) is NotDelivered and "lost during MAIL FROM" in str(failure)
    assert await outcome(await transport.send(person("bob@example.test"), "four")) is None
    assert [r.message["Subject"] for r in smtp_sink.received] == ["one", "two", "four"]
    await transport.close()


async def test_a_connection_lost_before_the_answer_to_data_is_not_delivered_and_the_next_goes(
        smtp_sink: SmtpSink) -> None:
    transport = await started(config_for(smtp_sink))
    smtp_sink.drops["DATA"] = 1
    first = await transport.send(person("bob@example.test"), Outgoing("x", message_id="<m1@bot.example.test>"))
    second = await transport.send(person("bob@example.test"), "queued behind it")
    failure = await outcome(first)
    # the server may have it, but never said so: the outbox sends it again with the same Message-ID
    assert type(failure) is NotDelivered and "lost during DATA" in str(failure)
    assert await outcome(second) is None
    assert smtp_sink.connections == 2
    assert await outcome(await transport.send(person("bob@example.test"),
                                              Outgoing("x", message_id="<m1@bot.example.test>"))) is None
    first_copy, queued, second_copy = smtp_sink.received
    assert first_copy.message_id == second_copy.message_id == "<m1@bot.example.test>"    # a receiver drops it
    assert queued.message["Subject"] == "queued behind it" and queued.connection == 2
    await transport.close()


async def test_a_server_that_wants_a_login_the_config_lacks_holds_off_too(
        smtp_sinks: Callable[..., SmtpSink]) -> None:
    sink = smtp_sinks(users={"bot": SECRET})            # AUTH required; the bot has no user configured
    transport = await started(config_for(sink))
    failure = await outcome(await transport.send(person("bob@example.test"), "hi"))
    assert type(failure) is NotDelivered and "wants a login (530" in str(failure)
    assert "set user and password_env" in str(failure)
    assert not transport.ready and sink.received == []
    await transport.close()


async def test_a_failed_receipt_nobody_awaits_is_not_logged_as_an_error(
        smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture) -> None:
    transport = await started(config_for(smtp_sink))
    await transport.send(person("not an address"), "refused before sending")
    await transport.send(person("ghost@refused.test"), "refused by the server")
    await transport.send(person("bob@example.test"), "delivered")
    deadline = time.monotonic() + 5
    while len(smtp_sink.received) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await transport.close()
    await transport.send(person("bob@example.test"), "after close")
    gc.collect()                                  # a dropped future with an unretrieved exception logs now
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
