"""Per-project notifications over a real SQLite store and engine: routes by
project tree (extend and override), the watcher writing rows in the
transition's commit, subscriptions and digests across a restart, flood
summaries, chat-to-mail fallback, the commands and their refusals, and the
config checks with file:line.  (Delivery to real servers: test_outbox_e2e.)"""
from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bot.access import Directory, IrcIds, User
from bot.chat import VERIFIED_SERVICES, Identity, Message, Offline, Outgoing, Person, Room
from bot.commands import Dispatcher, default_registry
from bot.config import load_config
from engine.configkit import Findings, Section
from engine.engine import Engine
from engine.events import Event
from engine.participant_runtime import ParticipantEnv
from engine.participants import Participant, ParticipantRegistry, Reply, Workitem
from engine.store import Store
from engine.timers import ManualClock
from engine.yamlconfig import ConfigError, loads_yaml
from notifiers.destinations import Book
from notifiers.outbox import Outbox, Settings
from notifiers.routes import NotificationConfig, kind_of, parse_notifications
from notifiers.routing import Flusher, Routing
from participants.builtin import Fail, Hold
from tests.engine_fixtures import spec_from_yaml

BOOK = Book({"net": "irc", "mail": "email"}, {}, {"alice": frozenset({"net", "mail"}), "bob": frozenset({"net"})})
ROUTES = """
notifications:
  flood_per_minute: 5
  templates:
    failed: {chat: "FAIL {{ instance.process }} #{{ instance.id }} at {{ step }}: {{ detail }}"}
  projects:
    "*":
      routes:
        - {events: [failed], to: ["irc:net:#all"]}
    Foo:
      routes:
        - {events: ["*"], to: ["irc:net:#foo"]}
    Foo:Bar:
      routes:
        - {events: [completed, "publish *"], to: ["email:bar@example.org"]}
    Foo:Bar:Baz:
      inherit: override
      routes:
        - {events: [failed], to: ["irc:net:#baz"]}
"""


def config(text: str = ROUTES, book: Book = BOOK) -> NotificationConfig:
    findings = Findings()
    top = Section(loads_yaml(textwrap.dedent(text), "bot.yaml"), "bot.yaml", findings, line=1)
    parsed = parse_notifications(top, book)
    assert not findings.problems, findings.problems
    return parsed


def test_routes_follow_the_project_tree_extend_and_override() -> None:
    cfg = config()
    def dests(project: str | None, kind: str) -> list[str]:
        return sorted({a.key for r in cfg.routes_for(project) if r.wants(kind) for a in r.to})
    assert dests(None, "failed") == ["room:net:#all"]
    assert dests("Foo", "failed") == ["room:net:#all", "room:net:#foo"]
    assert dests("Foo:Bar", "failed") == ["room:net:#all", "room:net:#foo"]              # inherited
    assert dests("Foo:Bar", "publish done") == ["mail:mail:bar@example.org", "room:net:#foo"]   # extended
    assert dests("Foo:Bar:Baz", "failed") == ["room:net:#baz"]                         # overridden
    assert dests("Foo:Bar:Baz", "completed") == []
    assert dests("Foo:Bar:Baz:Qux", "failed") == ["room:net:#baz"]                     # inherits the override


def test_bad_routes_are_reported_with_file_and_line() -> None:
    findings = Findings()
    text = textwrap.dedent("""\
        notifications:
          flood_per_minute: 0
          templates:
            failed: {chat: "{{ broken"}
          projects:
            Foo:
              inherit: sideways
              routes:
                - {events: [faild], to: ["irc:nonet:#x"]}
                - {events: [failed], to: ["email:not an address"]}
        """)
    parse_notifications(Section(loads_yaml(text, "bot.yaml"), "bot.yaml", findings, line=1), BOOK)
    got = [f"{p.line}: {p.message}" for p in findings.problems]
    assert any(g.startswith("2: ") and "flood_per_minute" in g for g in got), got
    assert any(g.startswith("4: ") and "bad template syntax" in g for g in got), got
    assert any(g.startswith("7: ") and "expected extend or override" in g for g in got), got
    assert any(g.startswith("9: ") and "unknown event kind 'faild'" in g for g in got), got
    assert any(g.startswith("9: ") and "no irc network 'nonet'" in g for g in got), got
    assert any(g.startswith("10: ") and "not a mail address" in g for g in got), got


def test_event_kinds() -> None:
    def ev(path: str, event: str, detail: str = "") -> Event:
        return Event(1, "p", 0.0, path, "s", event, "", detail, "Foo")
    assert kind_of(ev("", "launched")) == "launched"
    assert kind_of(ev("", "completed")) == "completed"
    assert kind_of(ev("", "completed", "recovered from build: boom")) == "recovered"
    assert kind_of(ev("0", "failed")) == "failed"
    assert kind_of(ev("0", "error")) == "step failed"
    assert kind_of(ev("0", "timer remind")) == "timer fired"
    assert kind_of(ev("0", "publish done")) == "publish done"
    assert kind_of(ev("0", "dispatched")) is None and kind_of(ev("0", "cancelled")) is None


class Publisher(Participant):
    name = "publisher"

    async def consume(self, workitem: Workitem) -> Reply:
        return Reply.done({"snapshot": 42}, events=[("publish done", "devel: snapshot 42")])


class Offliner:
    """A chat front-end on which nobody is online."""

    protocol, network, ready = "irc", "net", True

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, target: Any, message: Any) -> asyncio.Future[None]:
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if isinstance(target, Person):
            receipt.set_exception(Offline(f"{target.user} is not online on net"))
        else:
            self.sent.append(message.text if isinstance(message, Outgoing) else message)
            receipt.set_result(None)
        return receipt


class Mailer:
    protocol, network, ready = "email", "mail", True

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, ...], str, str]] = []

    async def send(self, target: Any, message: Any) -> asyncio.Future[None]:
        self.sent.append((target.accounts, message.subject, message.text))
        receipt: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        receipt.set_result(None)
        return receipt


class World:
    """A store, outbox, routing and engine as the app wires them."""

    def __init__(self, tmp_path: Path, clock: ManualClock, cfg: NotificationConfig) -> None:
        self.tmp_path, self.clock, self.cfg = tmp_path, clock, cfg

    async def start(self) -> "World":
        self.store = Store(self.tmp_path / "n.sqlite3")
        await asyncio.to_thread(self.store.open)
        self.outbox = Outbox(self.store, BOOK, lambda u, n: Person("irc", n, u, (u,)) if n == "net" else
                             Person("email", n, u, (f"{u}@example.org",)),
                             settings=Settings(retry_min=0.05, retry_max=0.1), clock=self.clock.now)
        await self.outbox.open()
        self.routing = Routing(self.store, self.outbox, self.cfg, clock=self.clock.now)
        await self.routing.open()
        registry = ParticipantRegistry([Hold(), Fail(), Publisher()])
        spec = spec_from_yaml("p", """
            name: p
            project: Foo
            steps:
              - participant: publisher
              - participant: fail
                params: {message: mirror down}
        """, registry.names())
        self.engine = Engine(self.store, {"p": spec}, registry, clock=self.clock, use_scheduler=False,
                             participant_env=ParticipantEnv(outbox=self.outbox))
        self.engine.watch(self.routing.rows_for)
        await self.engine.start()
        self.flusher = Flusher(self.routing)
        self.outbox.fallback_to = lambda user: "mail" if user in self.routing.fallback else None
        return self

    async def stop(self) -> None:
        await self.outbox.stop()
        await self.engine.stop()
        await asyncio.to_thread(self.store.close)

    async def rows(self, sql: str = "SELECT dest, text, state FROM outbox_messages ORDER BY id") -> list[Any]:
        return await self.store.read(lambda c: [tuple(r) for r in c.execute(sql)])


async def test_events_are_routed_in_the_transition_that_makes_them(tmp_path: Path) -> None:
    world = await World(tmp_path, ManualClock(), config()).start()
    try:
        iid = await world.engine.launch("p", {"project": "Foo:Bar"})
        await world.engine.idle()
        got = await world.rows()
        texts = {(d, t) for d, t, _s in got}
        assert ("room:net:#foo", f"[Foo:Bar] p #{iid} launched") in texts
        assert ("mail:mail:bar@example.org", f"[Foo:Bar] p #{iid} publish done at publisher@0: devel: snapshot 42") in texts
        assert ("room:net:#all", f"FAIL p #{iid} at fail@1: mirror down") in texts
        assert ("room:net:#foo", f"FAIL p #{iid} at fail@1: mirror down") in texts
        assert ("room:net:#foo", f"[Foo:Bar] p #{iid} publish done at publisher@0: devel: snapshot 42") in texts
        assert len(got) == 5      # the unhandled step error is told once, as "failed"
    finally:
        await world.stop()


async def test_subscriptions_and_digests_survive_a_restart(tmp_path: Path) -> None:
    clock = ManualClock()
    world = await World(tmp_path, clock, NotificationConfig()).start()
    try:
        now_sub = await world.routing.subscribe("bob", "Foo", "failed", "net", "")
        digest = await world.routing.subscribe("alice", "Foo", "*", "mail", "hourly")
        assert world.routing.subscriptions("alice") == [digest]
    finally:
        await world.stop()
    world = await World(tmp_path, clock, NotificationConfig()).start()     # a restart
    try:
        assert world.routing.subscriptions("bob") == [now_sub]
        await world.engine.launch("p")
        await world.engine.idle()
        assert [r[0] for r in await world.rows()] == ["user:bob@net"]      # bob at once; alice's digest waits
        assert await world.flusher.flush() == 0
        gathered = await world.rows("SELECT line FROM notify_digest ORDER BY id")
        assert len(gathered) == 3        # launched, publish done, failed
    finally:
        await world.stop()
    clock.advance(3600)
    world = await World(tmp_path, clock, NotificationConfig()).start()     # restarted after the hour
    try:
        assert await world.flusher.flush() == 1
        assert await world.flusher.flush() == 0                             # never twice
        [(dest, text, _state)] = [r for r in await world.rows() if r[0] == "user:alice@mail"]
        assert text.startswith("digest (3 event(s)):") and "mirror down" in text
        assert await world.rows("SELECT COUNT(*) FROM notify_digest") == [(0,)]
    finally:
        await world.stop()


async def test_a_burst_is_collapsed_into_one_summary_and_nothing_is_dropped(tmp_path: Path) -> None:
    clock = ManualClock()
    cfg = config()
    world = await World(tmp_path, clock, cfg).start()
    try:
        for _ in range(30):
            await world.engine.launch("p", {"project": "Foo:Bar:Baz"})      # each fails: one line to #baz
        await world.engine.idle()
        to_baz = [r for r in await world.rows() if r[0] == "room:net:#baz"]
        assert len(to_baz) == 5                                                # flood_per_minute
        assert await world.rows("SELECT COUNT(*) FROM notify_held") == [(25,)]
        assert await world.flusher.flush() == 0                                 # the minute is not over
        clock.advance(60)
        assert await world.flusher.flush() == 1
        summary = [r for r in await world.rows() if r[0] == "room:net:#baz"][-1][1]
        assert "25 more event(s)" in summary and "25 failed in Foo:Bar:Baz" in summary
        assert await world.rows("SELECT COUNT(*) FROM notify_held") == [(0,)]
        history = await world.engine.history(30)
        assert any(e.event == "failed" for e in history)                        # history has each of them
    finally:
        await world.stop()


async def test_chat_falls_back_to_mail_while_the_user_is_offline(tmp_path: Path) -> None:
    world = await World(tmp_path, ManualClock(), NotificationConfig()).start()
    irc, mail = Offliner(), Mailer()
    world.outbox.attach({"net": irc, "mail": mail})
    await world.outbox.start()
    try:
        await world.routing.subscribe("alice", "Foo", "failed", "net", "")
        await world.routing.subscribe("bob", "Foo", "failed", "net", "")
        await world.routing.set_fallback("alice", True)
        await world.engine.launch("p")
        await world.engine.idle()
        world.outbox.wake()          # (the app wakes it on every committed event)
        await asyncio.sleep(0.3)
        states = {d: s for d, _t, s in await world.rows()}
        assert states["user:alice@net"] == "rerouted"
        assert states["user:alice@mail"] == "delivered"
        assert states["user:bob@net"] == "queued"          # no fallback: waits for bob to come online
        [(to, subject, text)] = mail.sent
        assert to == ("alice@example.org",) and "mirror down" in text
    finally:
        await world.stop()


async def test_commands_subscribe_and_their_refusals(tmp_path: Path) -> None:
    world = await World(tmp_path, ManualClock(), config()).start()
    alice = User("alice", irc={"net": IrcIds(("alice",))}, emails=("alice@example.org",),
                 roles={"Foo": frozenset({"dev"})})
    carol = User("carol", irc={"net": IrcIds(("carol",))}, roles={"Other": frozenset({"dev"})})
    dispatcher = Dispatcher(world.engine, Directory([alice, carol]), default_registry(), outbox=world.outbox,
                            routing=world.routing)

    async def say(who: str, text: str) -> list[str]:
        ident = Identity("irc", "net", who, account=who, verified_by=VERIFIED_SERVICES)
        return (await dispatcher.handle(Message(ident, text))).lines
    try:
        assert (await say("alice", "subscribe Foo:Bar failed"))[0].startswith("subscribed: [1] Foo:Bar failed via net")
        assert (await say("alice", "subscribe Foo \"publish *\" via mail digest daily"))[0].endswith(
            "via mail, daily digest")
        assert "unknown project 'Nope'" in (await say("alice", "subscribe Nope failed"))[0]
        assert "unknown event kind 'faild'" in (await say("alice", "subscribe Foo faild"))[0]
        assert "unknown network" in (await say("alice", "subscribe Foo failed via elsewhere"))[0] or \
            "no identity on network 'elsewhere'" in (await say("alice", "subscribe Foo failed via elsewhere"))[0]
        assert "not authorised" in (await say("carol", "subscribe Foo failed"))[0]
        assert "not authorised" in (await say("carol", "subscribe * failed"))[0]
        assert (await say("carol", "subscriptions")) == ["0 subscription(s); fallback email off"]
        assert "no mail address" in (await say("carol", "fallback email on"))[0]
        assert (await say("alice", "fallback email on"))[0].startswith("fallback email on")
        assert (await say("alice", "subscriptions"))[-1] == "2 subscription(s); fallback email on"
        assert "no subscription 1" in (await say("carol", "unsubscribe 1"))[0]     # not hers
        assert (await say("alice", "unsubscribe 1"))[0].startswith("unsubscribed: [1]")
        reply = (await say("alice", "notify test Foo"))[0]
        assert reply == "test message queued for 2 destination(s): room:net:#all, room:net:#foo (see: outbox)" or \
            reply.startswith("test message queued for 1 destination(s)")
        assert "not authorised" in (await say("carol", "notify test Foo"))[0]
        assert await world.rows("SELECT COUNT(*) FROM notify_subscriptions") == [(1,)]
    finally:
        await world.stop()
