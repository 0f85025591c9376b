"""The XMPP front-end's parts that need no server: config checking, text
splitting, reconnect backoff."""
from __future__ import annotations

import asyncio
import textwrap
from typing import Any

import pytest

from bot.chat import Message, TransportError
from bot.configkit import Findings, Section
from bot.transports.xmpp import XmppConfig, XmppTransport, parse_config, split_text
from engine.yamlconfig import loads_yaml

NET = "test"


def cfg(**overrides: Any) -> XmppConfig:
    settings: dict[str, Any] = dict(name=NET, jid="bot@example.org", password="pw")
    settings.update(overrides)
    return XmppConfig(**settings)


# --- configuration -------------------------------------------------------------------

def parse(node: Any, file: str = "conf/bot.yaml", *,
          check: bool = False) -> tuple[XmppConfig | None, list[str], list[str]]:
    """As bot/config.py calls it: the entry without its protocol key, labelled by name."""
    findings = Findings(need_secrets=not check)
    label = f"xmpp network {node['name']!r}" if isinstance(node.get("name"), str) else "xmpp network"
    found = parse_config(Section(node, file, findings, label=label))
    return found, [str(p) for p in findings.problems], [str(p) for p in findings.warnings]


CONFIG = textwrap.dedent("""\
    networks:
      - name: jabber
        jid: releasebot@example.org
        password_env: TEST_XMPP_PASSWORD
        rooms: [release@conference.example.org]
        tls: starttls
        rate: 2
        reconnect_max: 5m
      - name: broken
        jid: not a jid@@
        password: hunter2
        password_env: TEST_XMPP_MISSING
        port: "5222"
        tls: sometimes
        rooms: [release@conference.example.org/nick]
        colour: blue
""")


def test_parse_config_reports_every_problem_with_file_and_line(monkeypatch: Any) -> None:
    monkeypatch.setenv("TEST_XMPP_PASSWORD", "s3cret-value")
    monkeypatch.delenv("TEST_XMPP_MISSING", raising=False)
    good, broken = loads_yaml(CONFIG, "conf/bot.yaml")["networks"]

    config, problems, _ = parse(good)
    assert problems == [] and config is not None
    assert (config.name, config.jid, config.password, config.rooms, config.tls, config.rate,
            config.reconnect_max) == (
        "jabber", "releasebot@example.org", "s3cret-value", ("release@conference.example.org",),
        "starttls", 2.0, 300.0)
    assert "s3cret" not in repr(config)

    config, problems, _ = parse(broken)
    assert config is None
    assert sorted(problems) == sorted([
        "conf/bot.yaml:10: xmpp network 'broken': jid: not a valid JID (second @ found before parsing the resource)",
        "conf/bot.yaml:11: xmpp network 'broken': password: secrets are not written in config files; put it in "
        "an environment variable and name it with password_env",
        "conf/bot.yaml:12: xmpp network 'broken': password_env: environment variable TEST_XMPP_MISSING is not "
        "set (or empty)",
        "conf/bot.yaml:13: xmpp network 'broken': port: expected int, got '5222'",
        "conf/bot.yaml:14: xmpp network 'broken': tls: expected one of starttls, direct, plaintext",
        "conf/bot.yaml:15: xmpp network 'broken': room 'release@conference.example.org/nick': expected a bare JID "
        "like name@example.org",
        "conf/bot.yaml:16: xmpp network 'broken': unknown key 'colour' (expected name, jid, password_env, host, port, "
        "tls, ca_file, rooms, nick, command_prefix, rate, burst, reconnect_min, reconnect_max, keepalive, "
        "max_line_chars)",
    ]), problems
    assert not any("hunter2" in p for p in problems)

    missing, problems, _ = parse(loads_yaml("name: x\n", "b.yaml"), "b.yaml")
    assert missing is None
    assert sorted(problems) == ["b.yaml:1: xmpp network 'x': missing 'jid'",
                                "b.yaml:1: xmpp network 'x': missing 'password_env'"]


def test_check_without_the_password_warns_and_the_transport_refuses_to_start(monkeypatch: Any) -> None:
    monkeypatch.delenv("TEST_XMPP_MISSING", raising=False)
    node = loads_yaml("name: j\njid: bot@example.org\npassword_env: TEST_XMPP_MISSING\n", "b.yaml")
    config, problems, warnings = parse(node, "b.yaml", check=True)
    assert problems == [] and config is not None and config.password is None
    assert warnings == ["b.yaml:3: xmpp network 'j': password_env: environment variable TEST_XMPP_MISSING is "
                        "not set (or empty); the bot will refuse to start without it"]

    async def nothing(message: Message) -> None:
        raise AssertionError("no message expected")
    with pytest.raises(TransportError, match="xmpp j: no password"):
        asyncio.run(XmppTransport(config).start(nothing))


NETWORK = textwrap.dedent("""\
    networks:
      - name: {name}
        jid: {jid}
        password_env: TEST_XMPP_PASSWORD
{extra}""")


def one_network(name: str, jid: str, **extra: str) -> Any:
    lines = "".join(f"        {key}: {value}\n" for key, value in extra.items())
    return loads_yaml(NETWORK.format(name=name, jid=jid, extra=lines), "conf/bot.yaml")["networks"][0]


def test_parse_config_allows_plaintext_only_to_a_loopback_host(monkeypatch: Any) -> None:
    monkeypatch.setenv("TEST_XMPP_PASSWORD", "s3cret-value")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2", "LOCALHOST."):
        config, problems, _ = parse(one_network("t", "bot@example.org", host=f'"{host}"', tls="plaintext"))
        assert problems == [] and config is not None and config.tls == "plaintext", host
    config, problems, _ = parse(one_network("t", "bot@localhost", tls="plaintext"))   # host from the jid
    assert problems == [] and config is not None

    config, problems, _ = parse(one_network("remote", "bot@example.org", host="xmpp.example.org", tls="plaintext"))
    assert config is None and problems == [
        "conf/bot.yaml:6: xmpp network 'remote': tls: plaintext is only allowed to a loopback host "
        "(localhost, 127.0.0.1, ::1), not 'xmpp.example.org': the password would cross the network unencrypted"]
    config, problems, _ = parse(one_network("derived", "bot@example.org", tls="plaintext"))
    assert config is None and problems == [
        "conf/bot.yaml:5: xmpp network 'derived': tls: plaintext is only allowed to a loopback host "
        "(localhost, 127.0.0.1, ::1), not 'example.org' (the jid's domain; set host): the password would "
        "cross the network unencrypted"]
    config, problems, _ = parse(one_network("tls", "bot@example.org", tls="starttls"))
    assert problems == [] and config is not None                   # TLS to anywhere is fine


def test_parse_config_refuses_a_keepalive_under_one_second(monkeypatch: Any) -> None:
    monkeypatch.setenv("TEST_XMPP_PASSWORD", "s3cret-value")
    for value in ("0s", "0", "500ms", "0.9s"):
        config, problems, _ = parse(one_network("k", "bot@example.org", keepalive=value))
        assert config is None and problems == [
            "conf/bot.yaml:5: xmpp network 'k': keepalive: at least 1s (how often an idle connection is "
            "pinged: without pings a dead connection is never noticed)"], value
    for value, seconds in (("1s", 1.0), ("90s", 90.0)):
        config, problems, _ = parse(one_network("k", "bot@example.org", keepalive=value))
        assert problems == [] and config is not None and config.keepalive == seconds
    config, problems, _ = parse(one_network("k", "bot@example.org"))
    assert config is not None and config.keepalive == 60.0           # the default


# --- text -------------------------------------------------------------------------------

def test_split_text_keeps_every_character_and_packs_lines() -> None:
    words = " ".join(f"word{i}" for i in range(400))          # ~3,500 characters
    chunks = split_text(f"first\n\n{words}\nlast", 1000)
    assert all(len(c) <= 1000 for c in chunks)
    assert chunks[0].startswith("first\nword0 ") and chunks[-1].endswith(" word399\nlast")
    assert " ".join(" ".join(chunks).split("\n")) == f"first {words} last"   # only break spaces/newlines go
    assert split_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]
    assert split_text("a  b", 2) == ["a ", "b"]                # only the break's own space goes
    assert split_text("ab\ncd\nef\n\ngh", 5) == ["ab\ncd", "ef\ngh"]   # lines share a message while they fit
    assert split_text("ab\ncd", 4) == ["ab", "cd"]              # a message breaks only between lines


# --- reconnecting ---------------------------------------------------------------------------

def test_reconnect_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    config = cfg(reconnect_min=1.0, reconnect_max=8.0)
    least, most = XmppTransport(config, rng=lambda: 0.0), XmppTransport(config, rng=lambda: 1.0)
    assert [least._backoff(n) for n in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert [most._backoff(n) for n in range(6)] == [1, 2, 4, 8, 8, 8]
