"""The mail-in keys of a `protocol: email` network, checked with file:line."""
from __future__ import annotations

import textwrap

from bot.transports.email.config import parse_config
from engine.configkit import Findings, Section
from engine.yamlconfig import loads_yaml


def problems(text: str) -> list[str]:
    findings = Findings(need_secrets=False)
    node = loads_yaml(textwrap.dedent(text), "bot.yaml")
    parse_config(Section(node, "bot.yaml", findings, label="email network 'mail'"))
    return [f"{p.line}: {p.message}" for p in findings.problems]


BASE = """\
name: mail
smtp_host: 127.0.0.1
security: plaintext
from: bot@example.test
"""


def test_a_good_mail_in_config_has_no_problems() -> None:
    assert problems(BASE + """\
reply_address: releases@example.test
token_lifetime: 7d
imap: {host: imap.example.test, user: bot, password_env: IMAP_PW, processed_folder: Done}
listen: {host: 0.0.0.0, port: 2525, addresses: [bot@example.test, releases@example.test]}
trust: {authserv_id: mx.example.test, domains: [example.test]}
""") == []


def test_bad_mail_in_config_is_named_at_its_line() -> None:
    got = problems(BASE + """\
reply_address: bot+x@example.test
imap: {host: imap.example.test, user: bot, password_env: IMAP_PW, tls: false, mailbox: INBOX, processed_folder: INBOX, password: x}
listen: {addresses: ["Bot <bot@example.test>"], sender_rate: 0, colour: red}
trust: {authserv_id: "mx example"}
""")
    assert any(g.startswith("5: ") and "reply_address" in g and "plain address" in g for g in got), got
    assert any(g.startswith("6: ") and "tls: false is only allowed to a loopback host" in g for g in got), got
    assert any(g.startswith("6: ") and "must differ from the mailbox" in g for g in got), got
    assert any(g.startswith("6: ") and "secrets are not written in config files" in g for g in got), got
    assert any(g.startswith("7: ") and "unknown key 'colour'" in g for g in got), got
    assert any(g.startswith("7: ") and "sender_rate: at least 1" in g for g in got), got
    assert any(g.startswith("7: ") and "addresses" in g and "plain address" in g for g in got), got
    assert any(g.startswith("8: ") and "missing 'domains'" in g for g in got), got


def test_trust_needs_a_way_in() -> None:
    got = problems(BASE + "trust: {authserv_id: mx.example.test, domains: [example.test]}\n")
    assert got == ["5: email network 'mail': trust: there is no mail in (imap or listen) for it to vouch for"]
