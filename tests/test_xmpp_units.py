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

from bot.chat import Identity, Message, NotDelivered, Outgoing, Person, Room, TransportError, Undeliverable
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


class FakeSM:
    """slixmpp's xep_0198 as Delivery sees it: on or off, and ack requests counted."""

    def __init__(self) -> None:
        self.enabled_out = False
        self.unacked_queue: list[tuple[int, Stanza]] = []
        self.ack_requests = 0

    def request_ack(self) -> None:
        self.ack_requests += 1


@dataclass
class FakeClient:
    """Writes every message at once, on a stream without stream management
    unless ``plugin["xep_0198"].enabled_out``; the server answers each ping
    at once unless ``answer_pings`` is False (then ``pending`` holds them)."""

    delivery: Delivery
    sent: list[tuple[str, str]] = field(default_factory=list)
    stanzas: list[Stanza] = field(default_factory=list)
    transport: object = object()
    boundjid: Any = field(default_factory=lambda: type("Jid", (), {"host": "example.org"})())
    plugin: dict[str, Any] = field(default_factory=dict)
    answer_pings: bool = True
    pings: int = 0
    pending: list[asyncio.Future[None]] = field(default_factory=list)
    aborted: int = 0

    def __post_init__(self) -> None:
        self.plugin.update({"xep_0198": FakeSM(), "xep_0199": self})

    def make_message(self, mto: str, mbody: str, mtype: str) -> Stanza:
        return Stanza(to=mto, body=mbody, type=mtype)

    def send(self, msg: Stanza) -> None:
        if self.delivery.outgoing(msg) is msg:
            self.sent.append((msg["to"], msg["body"]))
            self.stanzas.append(msg)

    def send_ping(self, jid: str, timeout: float) -> asyncio.Future[None]:
        self.pings += 1
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.answer_pings:
            answer.set_result(None)
        else:
            self.pending.append(answer)
        return answer

    def abort(self) -> None:
        self.aborted += 1

    def ack(self, count: int) -> None:
        """The server acknowledges the next ``count`` stanzas written."""
        for _ in range(count):
            self.delivery.acked(self.stanzas.pop(0))


async def pumped(delivery: Delivery, client: FakeClient, until: int) -> list[tuple[str, str]]:
    """Go online and let the pump send until ``until`` messages went out (and
    the server's answers to what was written came in)."""
    delivery.online.set()
    delivery.wake()
    pump = asyncio.ensure_future(delivery.pump())
    try:
        for _ in range(1000):
            if len(client.sent) >= until:
                break
            await asyncio.sleep(0)
        for _ in range(3):
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
    receipts = [delivery.put("alice@example.org", "chat", f"a{i}") for i in range(3)]
    receipts.append(delivery.put("bob@example.org", "chat", "b0"))
    await pumped(delivery, client, 4)
    assert delivery.undelivered == 4 and len(delivery.inflight) == 4
    receipts.append(delivery.put("bob@example.org", "chat", "b1"))  # queued after the session died
    delivery.online.clear()
    delivery.session_ended()
    assert [line.body for _, line in delivery.queue] == ["a0", "a1", "a2", "b0", "b1"]
    assert not any(r.done() for r in receipts)                      # still open, not failed
    client.sent.clear()
    client.plugin["xep_0198"].enabled_out = False
    sent = await pumped(delivery, client, 5)
    assert [body for to, body in sent if to == "alice@example.org"] == ["a0", "a1", "a2"]
    assert [body for to, body in sent if to == "bob@example.org"] == ["b0", "b1"]
    await asyncio.wait_for(asyncio.gather(*receipts), 1)            # confirmed on the new session


# --- receipts, with the fake client -------------------------------------------------------------

async def test_without_stream_management_a_ping_after_the_batch_confirms_it() -> None:
    delivery, client = delivery_for(max_line_chars=100)
    client.answer_pings = False
    one = delivery.put("alice@example.org", "chat", "\n".join("x" * 80 for _ in range(3)))   # 3 stanzas
    two = delivery.put("bob@example.org", "chat", "hello")
    await pumped(delivery, client, 4)
    assert client.pings == 1 and not one.done() and not two.done()  # one ping for the batch, unanswered
    client.pending.pop().set_result(None)                           # the server answers it
    await asyncio.sleep(0)
    assert one.done() and one.result() is None and two.done() and delivery.undelivered == 0

    three = delivery.put("bob@example.org", "chat", "again")
    await pumped(delivery, client, 5)
    client.pending.pop().set_exception(RuntimeError("an error answer is still an answer"))
    await asyncio.sleep(0)
    assert three.done() and three.result() is None


async def test_a_confirming_ping_left_unanswered_drops_the_connection_and_the_batch_goes_again() -> None:
    from slixmpp.exceptions import IqTimeout

    delivery, client = delivery_for()
    client.answer_pings = False
    receipt = delivery.put("alice@example.org", "chat", "hello")
    await pumped(delivery, client, 1)
    client.pending.pop().set_exception(IqTimeout(None))
    await asyncio.sleep(0)
    assert client.aborted == 1 and not receipt.done()              # the connection goes, not the message
    delivery.session_ended()
    client.answer_pings = True
    assert await pumped(delivery, client, 2) == [("alice@example.org", "hello")] * 2
    assert receipt.done() and receipt.result() is None


async def test_with_stream_management_the_receipt_waits_for_the_ack_of_every_stanza() -> None:
    delivery, client = delivery_for(max_line_chars=100)
    client.plugin["xep_0198"].enabled_out = True
    receipt = delivery.put("alice@example.org", "chat", "\n".join("x" * 80 for _ in range(3)))
    await pumped(delivery, client, 3)
    assert client.plugin["xep_0198"].ack_requests == 1 and client.pings == 0
    client.ack(2)
    assert not receipt.done()
    client.ack(1)
    await asyncio.sleep(0)
    assert receipt.done() and receipt.result() is None


async def test_a_bounce_before_the_confirmation_fails_the_receipt_and_stops_the_rest(caplog: Any) -> None:
    delivery, client = delivery_for(max_line_chars=100, rate=1.0, burst=1)    # one now, the next in 1s
    client.plugin["xep_0198"].enabled_out = True
    room = delivery.put(ROOM, "groupchat", "\n".join(f"{i} " + "x" * 80 for i in range(5)))
    await pumped(delivery, client, 1)
    first = client.stanzas[0]
    delivery.bounced(first["id"], "mallory@example.org/x", "forbidden", "", "cancel")    # not from the room
    assert not room.done() and "ignoring a bounce from mallory@example.org/x" in caplog.text
    delivery.bounced(first["id"], ROOM, "not-acceptable", "Only occupants may speak", "cancel")
    with pytest.raises(Undeliverable, match=f"xmpp test: {ROOM} refused the message: not-acceptable "
                                             r"\(Only occupants may speak\)"):
        await room
    await pumped(delivery, client, 2)
    assert len(client.sent) == 1 and len(delivery.queue) == 0      # the rest is dropped, not sent
    client.ack(1)                                                  # the ack that follows changes nothing
    assert delivery.undelivered == 0 and isinstance(room.exception(), Undeliverable)


async def test_a_bounce_after_the_confirmation_is_only_logged_and_a_wait_error_is_not_final(caplog: Any) -> None:
    delivery, client = delivery_for()
    client.plugin["xep_0198"].enabled_out = True
    hello = delivery.put("alice@example.org", "chat", "hello")
    await pumped(delivery, client, 1)
    hello_id = client.stanzas[0]["id"]
    client.ack(1)
    await asyncio.sleep(0)
    delivery.bounced(hello_id, "alice@example.org", "service-unavailable", "", "cancel")   # a remote server, later
    assert hello.result() is None
    assert "alice@example.org bounced a message after the server had confirmed it (or one that is not ours): " \
           "service-unavailable" in caplog.text
    busy = delivery.put("alice@example.org", "chat", "busy")
    await pumped(delivery, client, 2)
    delivery.bounced(client.stanzas[-1]["id"], "alice@example.org", "resource-constraint", "", "wait")
    with pytest.raises(NotDelivered, match="alice@example.org refused the message: resource-constraint"):
        await busy


async def test_a_receipt_its_holder_cancels_withdraws_what_was_not_written_yet() -> None:
    delivery, client = delivery_for()
    client.plugin["xep_0198"].enabled_out = True
    written = delivery.put("alice@example.org", "chat", "written")
    await pumped(delivery, client, 1)
    queued = delivery.put("alice@example.org", "chat", "queued")
    with pytest.raises(asyncio.TimeoutError):                      # e.g. an outbox that stops waiting
        await asyncio.wait_for(queued, 0.001)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(written, 0.001)
    delivery.session_ended()                                       # the written one is not sent again either
    assert await pumped(delivery, client, 2) == [("alice@example.org", "written")]
    assert delivery.undelivered == 0 and delivery._open == {}


async def test_a_full_queue_or_an_overlong_message_fails_its_receipt_but_the_cut_text_still_goes() -> None:
    delivery, client = delivery_for(max_queued_lines=10)
    long = delivery.put("alice@example.org", "chat", "\n".join(f"#{i}" for i in range(25)))
    with pytest.raises(Undeliverable, match=r"25 lines: more than max_queued_lines \(10\)"):
        await long
    full = delivery.put("alice@example.org", "chat", "more")
    with pytest.raises(NotDelivered, match="too many lines queued for alice@example.org .*try again later"):
        await full
    sent = await pumped(delivery, client, 1)
    assert sent == [("alice@example.org", "\n".join([*(f"#{i}" for i in range(9)), overflow_note(16)]))]
    fits = delivery.put("alice@example.org", "chat", "now it fits")
    nothing = delivery.put("alice@example.org", "chat", "")
    await pumped(delivery, client, 2)
    assert await fits is None and await nothing is None


async def test_drops_fail_receipts_and_close_fails_the_open_ones_with_not_delivered() -> None:
    transport = XmppTransport(cfg(rooms=(ROOM,)))
    delivery = transport._delivery
    in_room = delivery.put(ROOM, "groupchat", "to the room")
    to_carol = delivery.put(f"{ROOM}/carol", "chat", "to carol through the room")
    to_alice = delivery.put("alice@example.org", "chat", "to alice")
    transport._departed(Departure(ROOM, "carol"))
    transport._departed(Departure(ROOM, None))
    with pytest.raises(Undeliverable, match=f"{ROOM}/carol left the room"):
        await to_carol
    with pytest.raises(NotDelivered, match=f"not in {ROOM} now"):
        await in_room
    await transport.close(flush_timeout=0)
    with pytest.raises(NotDelivered, match="xmpp test: closed before the server confirmed it"):
        await to_alice
    after = await transport.send(Identity("xmpp", NET, "alice@example.org"), "too late")
    with pytest.raises(NotDelivered, match="xmpp test: closed"):
        await after


async def test_failed_receipts_nobody_awaits_make_no_noise(caplog: Any) -> None:
    import gc

    loop = asyncio.get_running_loop()
    complaints: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: complaints.append(context))
    try:
        delivery, _client = delivery_for(max_queued_lines=10)
        delivery.put("alice@example.org", "chat", "\n".join(f"#{i}" for i in range(25)))   # fails at once
        delivery.put(f"{ROOM}/carol", "chat", "to carol")
        delivery.drop_occupant(ROOM, "carol")
        delivery.put("bob@example.org", "chat", "to bob")
        delivery.close("closed")
        del delivery
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert complaints == []
    # what the check relies on: a plain future failed and dropped is reported
    plain: asyncio.Future[None] = loop.create_future()
    plain.set_exception(NotDelivered("x"))
    loop.set_exception_handler(lambda _loop, context: complaints.append(context))
    try:
        del plain
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [c["message"] for c in complaints] == ["Future exception was never retrieved"]


async def test_a_person_is_sent_to_at_each_bare_jid_and_never_to_a_room_or_a_nick() -> None:
    transport = XmppTransport(cfg(rooms=(ROOM,)))
    transport.trust.joining(ROOM)
    transport.trust.joined(ROOM, "releasebot", {110})

    async def refused(person: Person) -> str:
        receipt = await transport.send(person, "hello")
        with pytest.raises(Undeliverable) as info:
            await receipt
        return str(info.value)

    assert await refused(Person("xmpp", NET, "alice")) == "alice has no JID on test"
    assert await refused(Person("xmpp", NET, "alice", (f"{ROOM}/alice",))) == (
        f"xmpp test: alice's JID '{ROOM}/alice' is not a bare JID like name@example.org")
    assert await refused(Person("xmpp", NET, "alice", (ROOM,))) == (
        f"xmpp test: alice's JID '{ROOM}' is a room, not a person")
    assert (await refused(Person("xmpp", NET, "alice", ("not a jid@@",)))).startswith(
        "xmpp test: alice's JID 'not a jid@@' is not valid")
    with pytest.raises(TransportError, match="xmpp test: cannot send to alice@other"):
        await transport.send(Person("xmpp", "other", "alice", ("alice@example.org",)), "hello")

    receipt = await transport.send(Person("xmpp", NET, "alice", ("Alice@Example.org", "alice@example.org",
                                                                 "alice@work.example.org"), handle=f"{ROOM}/alice"),
                                   Outgoing(text="release 1.2 is out", subject="ignored in chat"))
    assert [(key, m.body) for key, m in transport._delivery.queue] == [
        (("alice@example.org", "chat"), "release 1.2 is out"),       # once per account, normalised
        (("alice@work.example.org", "chat"), "release 1.2 is out")]       # never the nick it was seen as
    assert not receipt.done()
    assert not transport.ready                                       # not started: not connected
    await transport.close(flush_timeout=0)


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
