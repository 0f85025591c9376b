"""The IRC front-end without a server: its bot.yaml entry (``parse_config``
through ``engine.configkit.Section``) and its text helpers."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bot.config import load_config
from engine.configkit import Findings, Section
from bot.network import is_loopback
from bot.transports.irc import DEFAULT_BURST, DEFAULT_MAX_QUEUED, IrcConfig, parse_config
from bot.transports.irc.text import casefolder, clean_lines, split_all, split_utf8
from engine.participants import ParticipantRegistry
from engine.yamlconfig import ConfigError, loads_yaml
from participants import discover

ROOT = Path(__file__).resolve().parent.parent


def test_splitting_respects_utf8_and_prefers_spaces() -> None:
    head, rest = split_utf8("ab€cd", 4)                    # € is 3 bytes: never cut inside it
    assert (head, rest) == ("ab", "€cd")
    head, rest = split_utf8("alpha beta gamma", 12)
    assert (head, rest) == ("alpha beta", "gamma")
    assert split_utf8("short", 100) == ("short", "")
    assert split_all("alpha beta gamma delta", 12) == ["alpha beta", "gamma delta"]
    assert clean_lines("a\r\nb\n\n  \nc\u2028d\x00") == ["a", "b", "c", "d\ufffd"]


def test_nicks_compare_by_the_servers_casemapping() -> None:
    assert casefolder("rfc1459")("Nick[]\\~") == "nick{}|^"
    assert casefolder("strict-rfc1459")("Nick[]\\~") == "nick{}|~"
    assert casefolder("ascii")("Nick[]\\~") == "nick[]\\~"
    assert casefolder("unheard-of")("A[") == "a{"                    # unknown: rfc1459, the default


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


def parse(text: str, file: str = "bot.yaml", *, need_secrets: bool = True) -> tuple[IrcConfig | None, list[str]]:
    """As bot.config does it: (the config or None, every problem as file:line: message)."""
    cfg, problems, _ = parse_with_warnings(text, file, need_secrets=need_secrets)
    return cfg, problems


def parse_with_warnings(text: str, file: str = "bot.yaml", *,
                        need_secrets: bool = True) -> tuple[IrcConfig | None, list[str], list[str]]:
    node = network_node(text)
    findings = Findings(need_secrets=need_secrets)
    label = f"irc network {node['name']!r}" if isinstance(node.get("name"), str) else "irc network"
    cfg = parse_config(Section(node, file, findings, label=label))
    return cfg, [str(p) for p in findings.problems], [str(w) for w in findings.warnings]


def test_parse_config_reports_every_problem_with_file_and_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELEASEBOT_TEST_IRC_PW", raising=False)
    cfg, problems = parse(BOT_YAML, "conf/bot.yaml")
    assert cfg is None
    text = problems
    assert any(t.startswith("conf/bot.yaml:9: irc network 'libera': unknown key 'colour'") for t in text)
    assert "conf/bot.yaml:7: irc network 'libera': sasl_password_env: environment variable " \
           "RELEASEBOT_TEST_IRC_PW is not set (or empty)" in text
    assert any(t.startswith("conf/bot.yaml:10: irc network 'libera': pacing_rate: expected int or float") for t in text)
    assert any(t.startswith("conf/bot.yaml:11: irc network 'libera': reconnect_min: must not exceed") for t in text)
    assert len(problems) == 4


def test_parse_config_missing_keys_wrong_types_and_literal_secrets() -> None:
    cfg, problems = parse(("""\
        networks:
          - protocol: irc
            tls: "yes"
            channels: [ops]
            sasl_password: hunter2
        """), "bot.yaml")
    assert cfg is None
    text = problems
    assert "bot.yaml:2: irc network: missing 'name'" in text
    assert "bot.yaml:2: irc network: missing 'host'" in text
    assert "bot.yaml:2: irc network: missing 'nick'" in text
    assert any(t.startswith("bot.yaml:3: irc network: tls: expected bool") for t in text)
    assert any(t.startswith("bot.yaml:4: irc network: channels: 'ops' is not a channel") for t in text)
    assert any(t.startswith("bot.yaml:5: irc network: sasl_password: secrets are not written") for t in text)
    assert not any("hunter2" in t for t in text)


def test_parse_config_reads_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELEASEBOT_TEST_IRC_PW", "s3cret")
    cfg, problems = parse(("""\
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
    cfg, problems = parse((f"""\
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
        assert problems == [
            "bot.yaml:7: irc network 'libera': sasl_password_env: SASL PLAIN sends the password readable by "
            "anyone on the way; needs tls: true (plain text only to a loopback host)"]
        assert not any("s3cret" in p for p in problems)
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
    cfg, problems = parse((text.format(ca_file=bundle)), "bot.yaml")
    assert problems == [] and cfg is not None
    assert (cfg.ca_file, cfg.tls, cfg.tls_verify) == (str(bundle), True, True)
    cfg, problems = parse((text.format(ca_file=tmp_path / "missing.pem")), "bot.yaml")
    assert cfg is None
    assert problems == ["bot.yaml:6: irc network 'libera': ca_file: no such file"]
    cfg, problems = parse((text.format(ca_file=tmp_path)), "bot.yaml")     # a directory
    assert problems == ["bot.yaml:6: irc network 'libera': ca_file: no such file"]
    cfg, problems = parse((text.format(ca_file="[a, b]")), "bot.yaml")
    assert problems == ["bot.yaml:6: irc network 'libera': ca_file: expected str, got ['a', 'b']"]
    cfg, problems = parse((text.format(ca_file=bundle) + "    ca_bundle: x\n"), "bot.yaml")
    assert len(problems) == 1 and "unknown key 'ca_bundle'" in problems[0]
    assert "tls, tls_verify, ca_file, nick" in problems[0]             # the error text names the key
    cfg, problems = parse((text.format(ca_file=bundle) + "    tls: false\n"), "bot.yaml")
    assert problems == [
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
            "RELEASEBOT_TEST_IRC_PW is not set (or empty)") in problems


def test_max_queued_lines_is_per_target_and_at_least_ten() -> None:
    text = """\
        networks:
          - protocol: irc
            name: libera
            host: irc.libera.chat
            nick: releasebot
        """
    cfg, problems = parse(text)
    assert problems == [] and cfg is not None and cfg.max_queued_lines == DEFAULT_MAX_QUEUED == 60
    cfg, problems = parse(text + "    max_queued_lines: 10\n")
    assert problems == [] and cfg is not None and cfg.max_queued_lines == 10
    cfg, problems = parse(text + "    max_queued_lines: 9\n")
    assert cfg is None and problems == ["bot.yaml:6: irc network 'libera': max_queued_lines: at least 10"]
    cfg, problems = parse(text + "    max_queued_lines: many\n")
    assert cfg is None and problems[0].startswith("bot.yaml:6: irc network 'libera': max_queued_lines: expected int")


def test_check_needs_no_sasl_password_but_starting_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELEASEBOT_TEST_IRC_PW", raising=False)
    text = """\
        networks:
          - protocol: irc
            name: libera
            host: irc.libera.chat
            nick: releasebot
            sasl_password_env: RELEASEBOT_TEST_IRC_PW
        """
    cfg, problems, warnings = parse_with_warnings(text, need_secrets=False)      # check
    assert problems == [] and cfg is not None
    assert (cfg.sasl_account, cfg.sasl_password) == ("releasebot", None)
    assert warnings == ["bot.yaml:6: irc network 'libera': sasl_password_env: environment variable "
                        "RELEASEBOT_TEST_IRC_PW is not set (or empty); the bot will refuse to start without it"]
    cfg, problems, warnings = parse_with_warnings(text)                          # start
    assert cfg is None and warnings == []
    assert problems == ["bot.yaml:6: irc network 'libera': sasl_password_env: environment variable "
                        "RELEASEBOT_TEST_IRC_PW is not set (or empty)"]
