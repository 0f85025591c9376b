"""The durable outbox's own rules, over a real SQLite store and engine, with
a scripted front-end standing in for the networks (the end-to-end tests on
real servers are in tests/test_outbox_e2e.py): dedupe, order per
destination, a bad destination holding up nobody, retries and failures,
the notify step, durable command replies, destination checks."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bot.access import Directory, IrcIds, User
from bot.chat import Identity, Message, NotDelivered, Outgoing, Person, Room, Undeliverable, VERIFIED_SERVICES
from bot.commands import Dispatcher, default_registry
from bot.config import destination_problems
from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from engine.store import Store
from engine.timers import ManualClock
from notifiers.destinations import BadDestination, Book
from notifiers.outbox import Outbox, Settings
from participants.builtin import Echo, Hold
from engine.templating import MessageTemplate as Template
from participants.notify import Notify, NotifyConfig
from tests.engine_fixtures import spec_from_yaml

BOOK = Book({"net": "irc", "jab": "xmpp", "mail": "email"}, {"jab": frozenset({"ops@rooms.test"})},
            {"alice": frozenset({"net", "mail"}), "bob": frozenset({"jab"})})


class Scripted:
    """A front-end double keeping the transport contract: records what it is
    given; ``script[target]`` is a list of outcomes for the next sends to it
    (an exception to raise through the receipt, or None for delivered)."""

    def __init__(self, network: str, protocol: str = "irc") -> None:
        self.network, self.protocol = network, protocol
        self.ready = True
        self.sent: list[tuple[str, str]] = []
        self.script: dict[str, list[Exception | None]] = {}
        self.gate: asyncio.Event | None = None

    async def send(self, target: Any, message: str | Outgoing) -> asyncio.Future[None]:
        name = target.name if isinstance(target, Room) else ",".join(target.accounts)
        text = message.text if isinstance(message, Outgoing) else message
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outcome = self.script.get(name, []).pop(0) if self.script.get(name) else None
        if outcome is None:
            if self.gate is not None:
                await self.gate.wait()
            self.sent.append((name, text))
            receipt.set_result(None)
        else:
            receipt.set_exception(outcome)
        return receipt


def reach(user: str, network: str) -> Person | None:
    return {("alice", "net"): Person("irc", "net", "alice", ("alice-acct",)),
            ("alice", "mail"): Person("email", "mail", "alice", ("alice@example.org",))}.get((user, network))


async def make_outbox(tmp_path: Path, clock: Any = None, **settings: Any) -> tuple[Store, Outbox]:
    store = Store(tmp_path / "o.sqlite3")
    await asyncio.to_thread(store.open)
    outbox = Outbox(store, BOOK, reach, settings=Settings(retry_min=0.05, retry_max=0.2, **settings),
                    clock=clock or time.time)
    await outbox.open()
    return store, outbox


@pytest.fixture
async def box(tmp_path: Path) -> Any:
    store, outbox = await make_outbox(tmp_path)
    yield store, outbox
    await outbox.stop()
    await asyncio.to_thread(store.close)


async def rows(store: Store, sql: str = "SELECT id, dest, state, attempts, error FROM outbox_messages "
                                        "ORDER BY id") -> list[tuple[Any, ...]]:
    return await store.read(lambda c: [tuple(r) for r in c.execute(sql)])


async def test_a_message_written_twice_is_one_row(box: Any) -> None:
    store, outbox = box
    for _ in range(2):
        await store.commit(outbox.rows("event 7 completed", ["irc:net:#rel", "user:alice"], "done"))
    assert [r[1] for r in await rows(store)] == ["room:net:#rel", "user:alice@mail", "user:alice@net"]
    keys = await rows(store, "SELECT topic, digest FROM outbox_messages")
    mids = {outbox.message_id(t, d) for t, d in keys}
    assert len(mids) == 3 and all(m.startswith("<") and m.endswith("@releasebot.invalid>") for m in mids)


async def test_per_destination_order_and_a_failing_destination_holds_up_nobody(box: Any) -> None:
    store, outbox = box
    irc = Scripted("net")
    irc.script["#down"] = [NotDelivered("server busy")] * 3
    outbox.attach({"net": irc})
    ops = []
    for n in range(5):
        ops += outbox.rows(f"e{n}", ["irc:net:#down", "irc:net:#up"], f"line {n}")
    await store.commit(ops)
    await outbox.start()
    await outbox.idle()
    up = [t for d, t in irc.sent if d == "#up"]
    down = [t for d, t in irc.sent if d == "#down"]
    assert up == [f"line {n}" for n in range(5)]
    assert down == [f"line {n}" for n in range(5)]            # in order, after its retries
    # #up finished while #down was still waiting out its backoff
    assert irc.sent.index(("#up", "line 4")) < irc.sent.index(("#down", "line 0"))
    states = await rows(store)
    assert {r[2] for r in states} == {"delivered"}
    assert [r[3] for r in states if r[1] == "room:net:#down"][0] == 3     # tries recorded


async def test_permanent_failure_is_marked_with_the_reason_and_can_be_retried(box: Any) -> None:
    store, outbox = box
    irc = Scripted("net")
    irc.script["#nochan"] = [Undeliverable("403 #nochan :No such channel")]
    outbox.attach({"net": irc})
    await store.commit(outbox.rows("a", ["irc:net:#nochan"], "first") + outbox.rows("b", ["irc:net:#nochan"], "next"))
    await outbox.start()
    await outbox.idle()
    [failed] = await outbox.failures()
    assert failed.error == "403 #nochan :No such channel" and failed.text == "first"
    assert irc.sent == [("#nochan", "next")]        # the next one was not held up for ever
    again = await outbox.retry(failed.id)
    assert again is not None
    await outbox.idle()
    assert irc.sent[-1] == ("#nochan", "first")
    assert await outbox.failures() == []
    assert await outbox.retry(failed.id) is None     # delivered: nothing to retry


async def test_a_user_without_identity_there_and_an_unconfigured_network_fail(box: Any) -> None:
    store, outbox = box
    outbox.attach({"net": Scripted("net")})
    await store.commit(outbox.rows("x", ["user:bob"], "hi"))       # bob is on jab, which has no front-end now
    await outbox.start()
    await outbox.idle()
    [failed] = await outbox.failures()
    assert "not configured" in failed.error


async def test_a_network_that_is_down_waits_and_gives_up_only_after_give_up(tmp_path: Path) -> None:
    clock = ManualClock()
    store, outbox = await make_outbox(tmp_path, clock=clock.now, give_up=3600)
    irc = Scripted("net")
    irc.ready = False
    outbox.attach({"net": irc})
    try:
        await store.commit(outbox.rows("x", ["irc:net:#rel"], "hello"))
        await outbox.start()
        await asyncio.sleep(0.3)
        [(_id, _dest, state, attempts, error)] = await rows(store)
        assert state == "queued" and attempts >= 1 and error == "net is not connected"
        irc.ready = True              # back: the next try (here made at once) delivers it
        await outbox.retry(_id)
        await outbox.idle()
        assert irc.sent == [("#rel", "hello")]
        await store.commit(outbox.rows("y", ["irc:net:#rel"], "late"))
        irc.ready = False
        outbox.wake()
        await asyncio.sleep(0.2)
        clock.advance(3601)
        irc.ready = True
        for _ in range(100):
            failed = await outbox.failures()
            if failed:
                break
            await asyncio.sleep(0.05)
        assert failed and failed[0].text == "late" and "not delivered within" in failed[0].error
    finally:
        await outbox.stop()
        await asyncio.to_thread(store.close)


def test_destinations_are_checked_with_a_reason() -> None:
    assert [a.key for a in BOOK.resolve("user:alice")] == ["user:alice@mail", "user:alice@net"]
    assert BOOK.resolve("email:team@example.org")[0].key == "mail:mail:team@example.org"
    assert BOOK.resolve("xmpp:jab:ops@rooms.test")[0].key == "room:jab:ops@rooms.test"
    bad = {
        "irc:nonet:#x": "no irc network 'nonet'",
        "irc:net:nochannel": "is not an IRC channel",
        "irc:net:#a,#b": "is not an IRC channel",
        "xmpp:jab:other@rooms.test": "the bot does not join",
        "email:not-an-address": "is not a mail address",
        "email:a@b\nBcc: x@y": "is not a mail address",
        "user:mallory": "no user 'mallory'",
        "user:bob@net": "bob has no identity on net",
        "sms:123": "unknown kind",
    }
    for text, why in bad.items():
        with pytest.raises(BadDestination, match=why):
            BOOK.resolve(text)
    assert destination_problems(BOOK, ["irc:net:#ok", "{{ owner }}", "email:x"]) == [
        "destination 'email:x': 'x' is not a mail address (local@domain)"]


async def test_notify_writes_its_messages_with_the_step_and_completes(tmp_path: Path) -> None:
    store, outbox = await make_outbox(tmp_path)
    notify = Notify()
    config = NotifyConfig({"done": Template("{{ repo }} published by #{{ instance.id }}", "[rel] {{ repo }}")})
    registry = ParticipantRegistry([Echo(), Hold(), notify])
    spec = spec_from_yaml("p", """
        name: p
        inputs: {repo: str}
        steps:
          - participant: notify
            params: {to: ["irc:net:#rel", "email:team@example.org"], template: done}
          - participant: notify
            params: {to: "user:alice", message: "{{ repo }} is out", subject: "out"}
          - participant: notify
            params: {to: "user:alice", template: done}
          - participant: hold
    """, registry.names())
    engine = Engine(store, {"p": spec}, registry, clock=ManualClock(),
                    participant_env=ParticipantEnv(config={"notify": config}, outbox=outbox), use_scheduler=False)
    await engine.start()
    try:
        iid = await engine.launch("p", {"repo": "devel"})
        await engine.idle()
        got = await rows(store, "SELECT dest, text, subject, body, origin FROM outbox_messages ORDER BY id")
        assert got[0] == ("room:net:#rel", f"devel published by #{iid}", "[rel] devel",
                          f"devel published by #{iid}", f"#{iid} notify@0")
        assert got[1][:3] == ("mail:mail:team@example.org", f"devel published by #{iid}", "[rel] devel")
        assert [g[:3] for g in got[2:4]] == [("user:alice@mail", "devel is out", "out"),
                                             ("user:alice@net", "devel is out", "out")]
        assert (await engine.summary(iid)).status == "waiting"      # on the hold step: all notify steps done
    finally:
        await engine.stop()
        await asyncio.to_thread(store.close)


async def test_notify_template_failure_falls_back_to_a_plain_line(tmp_path: Path) -> None:
    store, outbox = await make_outbox(tmp_path)
    registry = ParticipantRegistry([Hold(), Notify()])
    spec = spec_from_yaml("q", """
        name: q
        steps:
          - participant: notify
            params: {to: "irc:net:#rel", template: t}
    """, registry.names())
    config = NotifyConfig({"t": Template("{{ nothere }} done")})
    engine = Engine(store, {"q": spec}, registry, clock=ManualClock(),
                    participant_env=ParticipantEnv(config={"notify": config}, outbox=outbox), use_scheduler=False)
    await engine.start()
    try:
        iid = await engine.launch("q")
        await engine.idle()
        assert (await engine.summary(iid)).status == "completed"
        [(text,)] = await rows(store, "SELECT text FROM outbox_messages")
        assert text == f"q #{iid}: notify@0"
    finally:
        await engine.stop()
        await asyncio.to_thread(store.close)


def test_notify_params_are_checked() -> None:
    notify = Notify()
    config = NotifyConfig({"t": Template("x")})
    assert notify.check_params({"to": "irc:net:#a", "message": "hi"}, config) == []
    assert notify.check_params({"to": "irc:net:#a", "template": "t"}, config) == []
    problems = notify.check_params({"to": 5, "template": "nope", "message": "x", "colour": 1}, config)
    assert any("unknown param 'colour'" in p for p in problems)
    assert any(p.startswith("to: expected") for p in problems)
    assert any("exclusive" in p for p in problems)
    assert notify.check_params({"to": "irc:net:#a"}, config) == [
        "missing 'message' (the chat line) or 'template' (a template named in bot.yaml)"]
    assert "unknown template 'nope'" in notify.check_params({"to": "irc:net:#a", "template": "nope"}, config)[0]


async def test_launch_reply_is_written_with_the_launch_and_not_sent_twice(tmp_path: Path) -> None:
    store, outbox = await make_outbox(tmp_path)
    registry = ParticipantRegistry([Hold()])
    spec = spec_from_yaml("w", "name: w\nlaunch_roles: [dev]\nsteps:\n  - participant: hold\n", registry.names())
    engine = Engine(store, {"w": spec}, registry, clock=ManualClock(), use_scheduler=False)
    await engine.start()
    alice = User("alice", irc={"net": IrcIds(("alice-acct",))}, roles={"*": frozenset({"dev"})})
    dispatcher = Dispatcher(engine, Directory([alice]), default_registry(), outbox=outbox)
    ident = Identity("irc", "net", "alice_", account="alice-acct", verified_by=VERIFIED_SERVICES)
    try:
        private = await dispatcher.handle(Message(ident, "launch w"))
        assert private.durable and private.lines == ["launched w as #1"]
        in_room = await dispatcher.handle(Message(ident, "cancel 1", Room("irc", "net", "#ops")))
        assert in_room.durable
        got = await rows(store, "SELECT dest, text, hint FROM outbox_messages ORDER BY id")
        assert got == [("user:alice@net", "launched w as #1 (re: launch w)", "alice_"),
                       ("room:net:#ops", "alice_: cancelled #1 (re: cancel 1)", "")]
        history = [e.event for e in await engine.history(1)]
        assert history[0] == "launched" and "cancelled" in history
        # read commands are answered directly, never replayed from the outbox
        listing = await dispatcher.handle(Message(ident, "ps all"))
        assert not listing.durable
        # a refused launch writes nothing
        refused = await dispatcher.handle(Message(ident, "launch nope"))
        assert not refused.ok and len(await rows(store)) == 2
    finally:
        await engine.stop()
        await asyncio.to_thread(store.close)


async def test_settled_messages_are_forgotten_after_keep(tmp_path: Path) -> None:
    clock = ManualClock()
    store, outbox = await make_outbox(tmp_path, clock=clock.now)
    try:
        await store.commit(outbox.rows("old", ["irc:net:#a"], "old") + outbox.rows("new", ["irc:net:#a"], "new")
                           + outbox.rows("waiting", ["irc:net:#b"], "waiting"))
        await store.commit([("UPDATE outbox_messages SET state = 'delivered', done_at = ? WHERE text = 'old'",
                             (clock.now() - 31 * 86400,), False),
                            ("UPDATE outbox_messages SET state = 'failed', done_at = ? WHERE text = 'new'",
                             (clock.now() - 86400,), False)])
        irc = Scripted("net")
        irc.ready = False
        outbox.attach({"net": irc})
        await outbox.start()
        await asyncio.sleep(0.2)
        left = await rows(store, "SELECT text FROM outbox_messages ORDER BY id")
        assert left == [("new",), ("waiting",)]       # a failure a day old stays for `outbox failed`
    finally:
        await outbox.stop()
        await asyncio.to_thread(store.close)
