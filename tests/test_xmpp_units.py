"""The XMPP front-end's parts that need no server: config checking, text
splitting, the outbound queue (fair, capped, dropped with its target,
requeued), reconnect backoff, and which messages are commands."""
from __future__ import annotations

import asyncio
import logging
import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.chat import Identity, Message, Room, TransportError
from engine.configkit import Findings, Section
from bot.outqueue import overflow_note
from bot.transports.xmpp import XmppConfig, XmppTransport, parse_config, split_text
from bot.transports.xmpp.delivery import Delivery
from bot.transports.xmpp.roomtrust import Departure
from engine.yamlconfig import loads_yaml

NET = "test"
ROOM = "ops@conference.example.org"


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
        max_queued_lines: 9
""")


def test_parse_config_reports_every_problem_with_file_and_line(monkeypatch: Any) -> None:
    monkeypatch.setenv("TEST_XMPP_PASSWORD", "s3cret-value")
    monkeypatch.delenv("TEST_XMPP_MISSING", raising=False)
    good, broken = loads_yaml(CONFIG, "conf/bot.yaml")["networks"]

    config, problems, _ = parse(good)
    assert problems == [] and config is not None
    assert (config.name, config.jid, config.password, config.rooms, config.tls, config.rate,
            config.reconnect_max, config.max_queued_lines) == (
        "jabber", "releasebot@example.org", "s3cret-value", ("release@conference.example.org",),
        "starttls", 2.0, 300.0, 60)
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
        "max_line_chars, max_queued_lines)",
        "conf/bot.yaml:17: xmpp network 'broken': max_queued_lines: at least 10",
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


# --- the outbound queue, with a fake client ------------------------------------------------

class Stanza(dict[str, Any]):
    name = "message"


@dataclass
class FakeClient:
    """Writes every message at once on a stream without acks (so written = delivered)."""

    delivery: Delivery
    sent: list[tuple[str, str]] = field(default_factory=list)
    transport: object = object()
    plugin: dict[str, Any] = field(default_factory=lambda: {"xep_0198": type("SM", (), {"enabled_out": False})()})

    def make_message(self, mto: str, mbody: str, mtype: str) -> Stanza:
        return Stanza(to=mto, body=mbody, type=mtype)

    def send(self, msg: Stanza) -> None:
        if self.delivery.outgoing(msg) is msg:
            self.sent.append((msg["to"], msg["body"]))


async def pumped(delivery: Delivery, client: FakeClient, until: int) -> list[tuple[str, str]]:
    """Go online and let the pump send until ``until`` messages went out."""
    delivery.online.set()
    delivery.wake()
    pump = asyncio.ensure_future(delivery.pump())
    try:
        for _ in range(1000):
            if len(client.sent) >= until:
                break
            await asyncio.sleep(0)
        return client.sent
    finally:
        pump.cancel()


def delivery_for(**overrides: Any) -> tuple[Delivery, FakeClient]:
    delivery = Delivery(cfg(**{"rate": 1e6, "burst": 1000, **overrides}), asyncio.Event())
    client = FakeClient(delivery)
    delivery.client = client
    return delivery, client


async def test_a_long_answer_to_one_jid_does_not_hold_up_a_short_one_to_another() -> None:
    delivery, client = delivery_for(max_line_chars=100)
    long_answer = "\n".join(f"line {i:02d} " + "x" * 80 for i in range(30))   # a message per line
    delivery.put("alice@example.org", "chat", long_answer)
    delivery.put("bob@example.org", "chat", "one line")
    sent = await pumped(delivery, client, 31)
    assert sent[1] == ("bob@example.org", "one line")             # after one of alice's, not thirty
    assert [body for to, body in sent if to == "alice@example.org"] == long_answer.split("\n")   # in order


async def test_the_cap_counts_lines_and_replaces_the_rest_with_a_note(caplog: Any) -> None:
    delivery, client = delivery_for(max_queued_lines=10)
    delivery.put("alice@example.org", "chat", "\n".join(f"#{i}" for i in range(25)))
    assert delivery.undelivered == 1                               # ten lines, packed into one message
    delivery.put("alice@example.org", "chat", "more")              # her queue is full: nothing fits
    delivery.put("bob@example.org", "chat", "\n".join(f"#{i}" for i in range(8)))   # bob has his own cap
    sent = await pumped(delivery, client, 2)
    assert sent == [("alice@example.org", "\n".join([*(f"#{i}" for i in range(9)), overflow_note(16)])),
                    ("bob@example.org", "\n".join(f"#{i}" for i in range(8)))]
    assert "16 line(s) to alice@example.org left out: more than max_queued_lines (10)" in caplog.text
    delivery.put("alice@example.org", "chat", "later")             # all sent: her queue has room again
    assert delivery.undelivered == 1


async def test_leaving_a_room_drops_its_queue_and_its_occupants_but_not_real_jids() -> None:
    transport = XmppTransport(cfg(rooms=(ROOM,)))
    delivery = transport._delivery
    delivery.put(ROOM, "groupchat", "to the room")
    delivery.put(f"{ROOM}/bob", "chat", "to bob through the room")
    delivery.put(f"{ROOM}/carol", "chat", "to carol through the room")
    delivery.put("alice@example.org", "chat", "to alice's real JID")
    transport._departed(Departure(ROOM, "carol"))                  # carol left: her route is gone
    assert delivery.queue.targets() == [(ROOM, "groupchat"), (f"{ROOM}/bob", "chat"),
                                        ("alice@example.org", "chat")]
    transport._departed(Departure(ROOM, "bob", "robert"))          # bob is robert now: his lines follow
    assert [(key, line.to) for key, line in delivery.queue if "/" in key[0]] == [
        ((f"{ROOM}/robert", "chat"), f"{ROOM}/robert")]
    transport._departed(Departure(ROOM, None))                     # the bot was kicked
    assert delivery.queue.targets() == [("alice@example.org", "chat")]
    delivery.put(f"{ROOM}/dave", "chat", "to dave")
    assert delivery.keep_occupants(ROOM, {"erin"}) == 1            # rejoined: dave is not there


async def test_unacknowledged_messages_go_first_after_a_new_session_in_order() -> None:
    delivery, client = delivery_for()
    client.plugin["xep_0198"].enabled_out = True                   # now nothing counts until acked
    for i in range(3):
        delivery.put("alice@example.org", "chat", f"a{i}")
    delivery.put("bob@example.org", "chat", "b0")
    await pumped(delivery, client, 4)
    assert delivery.undelivered == 4 and len(delivery.inflight) == 4
    delivery.put("bob@example.org", "chat", "b1")                  # queued after the session died
    delivery.online.clear()
    delivery.session_ended()
    assert [line.body for _, line in delivery.queue] == ["a0", "a1", "a2", "b0", "b1"]
    client.sent.clear()
    client.plugin["xep_0198"].enabled_out = False
    sent = await pumped(delivery, client, 5)
    assert [body for to, body in sent if to == "alice@example.org"] == ["a0", "a1", "a2"]
    assert [body for to, body in sent if to == "bob@example.org"] == ["b0", "b1"]


# --- reconnecting ---------------------------------------------------------------------------

def test_reconnect_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    least = XmppTransport(cfg(reconnect_min=1.0, reconnect_max=8.0), rng=lambda: 0.0)
    most = XmppTransport(cfg(reconnect_min=1.0, reconnect_max=8.0), rng=lambda: 1.0)
    assert [least._reconnect_delay(None, "cannot connect") for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert [most._reconnect_delay(None, "cannot connect") for _ in range(6)] == [1, 2, 4, 8, 8, 8]


class FakeSessionClient:
    def abort(self) -> None:
        raise AssertionError("a session that was up is not aborted")


async def test_backoff_starts_over_only_after_a_session_that_stayed_up_a_minute() -> None:
    now = [1000.0]
    transport = XmppTransport(cfg(reconnect_min=1.0, reconnect_max=64.0, keepalive=3600.0),
                              rng=lambda: 1.0, clock=lambda: now[0])
    transport._client = FakeSessionClient()

    async def session(lasting: float) -> float | None:
        """One connection whose session lasted ``lasting`` seconds on the clock."""
        period = asyncio.ensure_future(transport._connected_period())
        await asyncio.sleep(0)
        transport._session_up()
        now[0] += lasting
        transport._lost.set()
        lasted = await period
        transport._lost.clear()
        return lasted

    assert [transport._reconnect_delay(None, "cannot connect") for _ in range(3)] == [1, 2, 4]
    lasted = await session(5.0)                                    # logged in, dropped at once
    assert lasted == 5.0 and transport._reconnect_delay(lasted, "connection lost") == 8   # still backing off
    lasted = await session(59.0)
    assert transport._reconnect_delay(lasted, "connection lost") == 16
    lasted = await session(60.0)                                   # healthy: the outage was over
    assert transport._reconnect_delay(lasted, "connection lost") == 1
    assert transport._reconnect_delay(None, "cannot connect") == 2


# --- which messages are commands --------------------------------------------------------------

@dataclass
class Jid:
    full: str

    @property
    def bare(self) -> str:
        return self.full.split("/", 1)[0]

    @property
    def resource(self) -> str:
        return self.full.partition("/")[2]

    @property
    def user(self) -> str:
        return self.full.split("@", 1)[0] if "@" in self.full else ""

    def __str__(self) -> str:
        return self.full


class Msg(dict[str, Any]):
    def __init__(self, sender: str, body: str, mtype: str = "chat", delayed: bool = False) -> None:
        super().__init__({"from": Jid(sender), "body": body, "type": mtype, "id": "x"})
        self.delayed = delayed

    def get_plugin(self, name: str, check: bool = False) -> object | None:
        return object() if self.delayed else None


async def test_a_bare_prefix_or_address_is_passed_on_for_a_hint_and_other_chatter_is_not() -> None:
    transport = XmppTransport(cfg(rooms=(ROOM,), nick="releasebot"))
    got: list[Message] = []
    transport._inbound._dispatch = got.append                      # record instead of answering
    transport.trust.joining(ROOM)
    transport.trust.joined(ROOM, "releasebot", {110})
    for body in ("!", " ! ", "!ps", "! ps"):
        transport._inbound.message(Msg("alice@example.org/laptop", body))
    for body in ("!", "releasebot:", "ReleaseBot, ", "!whoami", "releasebot is great", "hello"):
        transport._inbound.message(Msg(f"{ROOM}/alice", body, "groupchat"))
    transport._inbound.message(Msg(f"{ROOM}/releasebot", "!", "groupchat"))   # ourselves: never
    transport._inbound.message(Msg("alice@example.org/laptop", "!", delayed=True))   # sent while offline
    direct = Identity("xmpp", NET, "alice@example.org/laptop", account="alice@example.org",
                      verified_by="server-verified JID")
    room = Room("xmpp", NET, ROOM, exposes_identities=False)
    assert [(m.text, m.sender.handle, m.room) for m in got] == [
        ("", direct.handle, None), ("", direct.handle, None), ("ps", direct.handle, None),
        ("ps", direct.handle, None), ("", f"{ROOM}/alice", room), ("", f"{ROOM}/alice", room),
        ("", f"{ROOM}/alice", room), ("whoami", f"{ROOM}/alice", room)]
    assert got[0].sender == direct
    assert transport.undelivered == 0                              # no "I was offline" for a bare "!"


def test_logging_of_departures_is_quiet_while_closing(caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="bot.transports.xmpp")
    transport = XmppTransport(cfg(rooms=(ROOM,)))
    transport._departed(Departure(ROOM, None))
    assert f"I am no longer in {ROOM}" in caplog.text
    caplog.clear()
    transport._closing = True
    transport._departed(Departure(ROOM, None))
    assert caplog.text == ""
