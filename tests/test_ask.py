"""The ``ask`` participant through the command path, over a real SQLite store
and engine with the outbox: quorum, self-approval, roles checked at answer
time, reminders, escalation and expiry on the injected clock, duplicate and
concurrent answers, withdrawal, audit, and the console's ``as``.
(Real networks: tests/test_ask_networks.py.)"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.access import Directory, IrcIds, User
from bot.chat import VERIFIED_CONSOLE, VERIFIED_SERVICES, Identity, Message
from bot.commands import Dispatcher, default_registry
from engine.engine import Engine
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from engine.store import Store
from engine.timers import ManualClock
from notifiers.destinations import Book
from notifiers.outbox import Outbox, Settings
from participants.ask import Ask
from participants.builtin import Echo, Hold
from tests.engine_fixtures import advance, spec_from_yaml

RELEASE = """
name: release
project: Project
launch_roles: [dev]
inputs: {version: str}
steps:
  - id: approve
    participant: ask
    timers: "4h: remind, 1d: escalate, 2d: expire"
    params:
      question: "Release {{ version }}?"
      to: ["role:rm"]
      quorum: {quorum}
      escalate_to: [erin]
      on_expiry: reject
  - participant: hold
"""


def user(name: str, **roles: str) -> User:
    return User(name, irc={"net": IrcIds((name,))}, emails=(f"{name}@example.org",),
                roles={"Project": frozenset(roles.values())} if roles else {})


class World:
    def __init__(self, tmp_path: Path, quorum: Any = 2, users: list[User] | None = None) -> None:
        self.tmp_path, self.quorum = tmp_path, quorum
        self.users = users or [user("admin"), user("alice", a="rm"), user("bob", a="rm"), user("carol", a="rm"),
                               user("dave", a="dev"), user("erin", a="dev")]
        self.users[0] = User("admin", roles={"*": frozenset({"admins"})})
        self.clock = ManualClock()

    async def start(self, db: str = "a.sqlite3") -> "World":
        self.store = Store(self.tmp_path / db)
        await asyncio.to_thread(self.store.open)
        book = Book({"net": "irc", "mail": "email"}, {},
                    {u.name: frozenset({"net", "mail"}) for u in self.users if u.name != "admin"})
        self.outbox = Outbox(self.store, book, lambda u, n: None, settings=Settings(), clock=self.clock.now)
        await self.outbox.open()
        self.ask = Ask()
        registry = ParticipantRegistry([Hold(), Echo(), self.ask])
        spec = spec_from_yaml("release", RELEASE.replace("{quorum}", str(self.quorum)), registry.names())
        self.directory = Directory(self.users)
        self.engine = Engine(self.store, {"release": spec}, registry, clock=self.clock, use_scheduler=False,
                             participant_env=ParticipantEnv(users=self.directory, outbox=self.outbox))
        await self.engine.start()
        self.dispatcher = Dispatcher(self.engine, self.directory, default_registry(), outbox=self.outbox)
        return self

    async def stop(self) -> None:
        await self.engine.stop()
        await asyncio.to_thread(self.store.close)

    async def say(self, who: str, text: str, network: str = "net") -> list[str]:
        ident = Identity("irc", network, who, account=who, verified_by=VERIFIED_SERVICES)
        return (await self.dispatcher.handle(Message(ident, text))).lines

    async def console(self, text: str) -> list[str]:
        ident = Identity("console", "console", "admin", account="admin", verified_by=VERIFIED_CONSOLE)
        return (await self.dispatcher.handle(Message(ident, text))).lines

    async def outbox_to(self, dest_prefix: str) -> list[str]:
        rows = await self.store.read(lambda c: [tuple(r) for r in c.execute(
            "SELECT dest, text FROM outbox_messages ORDER BY id")])
        return [t for d, t in rows if d.startswith(dest_prefix)]

    async def status(self, iid: int) -> str:
        return (await self.engine.summary(iid)).status


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    w = await World(tmp_path).start()
    yield w
    await w.stop()


async def launch(w: World, who: str = "dave", version: str = "1.2") -> int:
    iid = await w.engine.launch("release", {"version": version}, actor=f"{who} via irc:net")
    await w.engine.idle()
    return iid


async def test_two_of_three_approve_and_the_outcome_lands_in_fields_and_history(world: World) -> None:
    iid = await launch(world)
    asked = await world.outbox_to("user:alice@")
    assert len(asked) == 2 and asked[0].startswith(f"q1 from release #{iid} (Project): Release 1.2? "
                                                   "Fields: project=Project, version=1.2. Answer: "
                                                   "approve q1 [comment] | reject q1 [reason].")
    assert "Deadline: " in asked[0]
    assert (await world.say("alice", "pending"))[0].startswith("q1: Release 1.2? (release #1, Project;")
    assert await world.say("alice", "approve q1 looks good") == [
        "recorded your approve for q1 (1 approve of 2 needed)"]
    assert await world.say("bob", "approve 1") == ["recorded your approve: q1 is decided: approve"]
    await world.engine.idle()
    detail = await world.engine.describe(iid)
    assert detail.fields["answer"] == "approve" and [a["who"] for a in detail.fields["answers"]] == ["alice", "bob"]
    assert detail.fields["answers"][0]["verified"] == VERIFIED_SERVICES
    assert detail.fields["answers"][0]["comment"] == "looks good"
    history = [(e.event, e.detail) for e in await world.engine.history(iid)]
    assert ("question asked", "q1: Release 1.2? - asked alice, bob, carol (2 of 3 needed; by "
            + history[2][1].split("; by ", 1)[1]) in history
    answered = [d for e, d in history if e == "question answered"]
    assert answered[0].startswith("q1: alice approve via irc:net (services account) at ")
    assert ("question decided", "q1: approve") in history
    # everyone who answered is told
    assert any("q1 decided: approve" in t for t in await world.outbox_to("user:alice@"))
    # after the end: a clear reply, nothing changed
    assert await world.say("carol", "approve q1") == ["q1 is already decided: approve"]
    lines = await world.say("dave", "question q1")
    assert lines[1] == "asked: alice (rm), bob (rm), carol (rm)" and lines[-1].startswith("answer: bob approve")
    [decision] = await world.say("dave", "decisions Project")
    assert "q1 release #1 Project: Release 1.2? -> approve (decided): alice approve" in decision


async def test_refusals_change_nothing(world: World) -> None:
    await launch(world, who="alice")          # alice launched it: not asked, may not answer
    assert await world.say("alice", "approve q1") == ["you launched #1, so you may not answer q1"]
    assert await world.say("erin", "approve q1") == ["q1 was not asked of you"]
    assert await world.say("bob", "approve q9") == ["no question q9"]
    assert "bad question id" in (await world.say("bob", "approve x1"))[0]
    assert "'maybe' is not a choice of q1" in (await world.say("bob", "answer q1 maybe"))[0]
    assert (await world.say("bob", "reject q1 not yet"))[0].startswith("recorded your reject: q1 is decided: reject")


async def test_a_single_reject_ends_it_and_a_second_answer_is_refused(tmp_path: Path) -> None:
    w = await World(tmp_path, quorum="all").start()
    try:
        iid = await launch(w)
        assert (await w.say("bob", "approve q1"))[0].startswith("recorded your approve for q1")
        assert await w.say("bob", "reject q1") == ["you already answered q1: approve"]
        assert (await w.say("carol", "reject q1 broken"))[0] == "recorded your reject: q1 is decided: reject"
        await w.engine.idle()
        assert (await w.engine.describe(iid)).fields["answer"] == "reject"
    finally:
        await w.stop()


async def test_a_role_removed_between_asking_and_answering(tmp_path: Path) -> None:
    w = await World(tmp_path).start()
    try:
        await launch(w)
        # bob loses the role (users.yaml edited, bot restarted) before answering
        w.users[2] = user("bob", a="dev")
        await w.stop()
        w2 = World(tmp_path, users=w.users)
        w2.clock = w.clock
        await w2.start()
        try:
            assert await w2.say("bob", "approve q1") == ["you no longer hold rm on Project, so you may not answer q1"]
            assert (await w2.say("alice", "approve q1"))[0].startswith("recorded your approve for q1")
        finally:
            await w2.stop()
    finally:
        pass


async def test_remind_escalate_expire_on_the_clock(world: World) -> None:
    iid = await launch(world)
    await world.say("alice", "approve q1")
    before = len(await world.outbox_to("user:bob@"))
    await advance(world.engine, 4 * 3600)
    reminded = await world.outbox_to("user:bob@")
    assert len(reminded) == before + 2 and reminded[-1].startswith("Reminder: q1")
    assert not [t for t in await world.outbox_to("user:alice@") if t.startswith("Reminder")]   # alice answered
    await advance(world.engine, 20 * 3600)
    escalated = await world.outbox_to("user:erin@")
    assert escalated and escalated[0].startswith("Escalated to you: no decision yet (asked alice, bob, carol; "
                                                 "answered: alice approve)")
    assert (await world.say("erin", "approve q1"))[0] == "recorded your approve: q1 is decided: approve"
    await world.engine.idle()
    assert (await world.engine.describe(iid)).fields["answer"] == "approve"
    # a second instance expires with the declared outcome
    iid2 = await launch(world)
    await advance(world.engine, 2 * 86400 + 1)
    detail = await world.engine.describe(iid2)
    assert detail.fields["answer"] == "reject" and detail.fields["answers"] == []
    assert ("question expired", "q2: reject") in [(e.event, e.detail) for e in await world.engine.history(iid2)]
    assert await world.say("bob", "approve q2") == ["q2 expired: reject"]


async def test_concurrent_answers_make_exactly_one_outcome(tmp_path: Path) -> None:
    w = await World(tmp_path, quorum=1).start()
    try:
        iid = await launch(w)
        replies = await asyncio.gather(w.say("alice", "approve q1"), w.say("bob", "reject q1"),
                                       w.say("carol", "approve q1"), w.say("alice", "approve q1", network="other"))
        decided = [r for r in replies if "is decided" in r[0]]
        assert len(decided) == 1, replies
        await w.engine.idle()
        events = [e.event for e in await w.engine.history(iid)]
        assert events.count("question decided") == 1 and events.count("done") == 1
    finally:
        await w.stop()


async def test_cancel_withdraws_the_question(world: World) -> None:
    iid = await launch(world)
    await world.engine.cancel(iid, actor="dave via irc:net")
    await world.engine.idle()
    assert await world.say("bob", "approve q1") == ["q1 was withdrawn (its step was cancelled or timed out)"]
    assert await world.say("bob", "pending") == ["nothing waits for your answer"]


async def test_console_as_acts_for_a_user_and_is_recorded(world: World) -> None:
    iid = await launch(world)
    assert (await world.console("as alice approve q1"))[0].startswith("recorded your approve for q1")
    assert (await world.console("as bob approve q1"))[0].endswith("q1 is decided: approve")
    await world.engine.idle()
    answers = (await world.engine.describe(iid)).fields["answers"]
    assert answers[0]["verified"] == "console, as alice by admin"
    history = await world.engine.history(iid)
    assert any(e.event == "done" and e.actor == "bob via console:console (as, by admin)" for e in history)
    assert await world.say("alice", "as bob approve q1") == ["`as` works on the console only"]
    assert (await world.console("as nobody pending")) == ["usage: as <user> <command> (a user from users.yaml)"]


async def test_the_question_survives_a_restart_and_keeps_its_schedule(tmp_path: Path) -> None:
    w = await World(tmp_path).start()
    await launch(w)
    await w.say("alice", "approve q1")
    clock = w.clock
    await w.stop()
    w2 = World(tmp_path)
    w2.clock = clock
    await w2.start()
    try:
        assert (await w2.say("bob", "pending"))[0].startswith("q1: Release 1.2?")
        await advance(w2.engine, 4 * 3600)
        assert any(t.startswith("Reminder: q1") for t in await w2.outbox_to("user:carol@"))
        assert (await w2.say("bob", "approve q1"))[0].endswith("q1 is decided: approve")
        iid = await launch(w2)                          # a new question: a new number
        assert (await w2.say("bob", "pending"))[0].startswith("q2:")
        assert iid == 2
    finally:
        await w2.stop()


def test_the_shipped_release_approval_runs_to_the_end_on_the_console(tmp_path: Path) -> None:
    """The README's demo: the real bot on the console with the shipped conf/."""
    import shutil
    import time as _time

    from tests.botproc import ROOT, Bot

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    bot = Bot(tmp_path).start()
    try:
        assert bot.ask("launch release-approval version=1.2") == ["launched release-approval as #1"]
        for _ in range(50):              # the question is asked just after the launch's reply
            if bot.ask("as alice pending")[0].startswith("q1:"):
                break
            _time.sleep(0.1)
        assert bot.ask("approve q1") == ["you launched #1, so you may not answer q1"]
        assert bot.ask("as alice pending")[0].startswith("q1: Release version 1.2 of Project?")
        assert bot.ask("as alice approve q1 ship it") == ["recorded your approve for q1 (1 approve of 2 needed)"]
        assert bot.ask("as alice approve q1") == ["you already answered q1: approve"]
        assert bot.ask("as carol approve q1") == ["recorded your approve: q1 is decided: approve"]
        for _ in range(50):
            if "completed" in bot.ask("show 1")[0]:
                break
            _time.sleep(0.1)
        history = bot.ask("history 1")
        assert any("done: echo='releasing 1.2: approved by alice, carol'" in line for line in history), history
        assert history[-1].endswith("process completed")
        assert any("approve question answered: q1: alice approve via console:console (console, as alice by admin)" in line
                   for line in history), history
        [decision] = bot.ask("decisions Project")
        assert "-> approve (decided)" in decision
    finally:
        assert bot.stop() == 0
