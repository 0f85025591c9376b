"""The read-only `bug <tracker> <id>` chat command, against the fake Bugzilla
over real HTTP: who may read which tracker, missing and private bugs."""
from __future__ import annotations

from typing import Any

import pytest

from bot.access import Directory, IrcIds, User
from bot.chat import VERIFIED_SERVICES, Identity, Message
from bot.commands import Dispatcher, default_registry
from engine.participant_runtime import ParticipantEnv
from engine.participants import ParticipantRegistry
from participants.bugzilla import Bugzilla
from participants.builtin import Echo
from tests.engine_fixtures import EngineFactory
from tests.fakebugzilla import FakeBugzilla
from tests.test_bugzilla_participant import bmc, bmc_tracker, configure  # noqa: F401  (fixture)


async def test_bug_shows_a_bug_to_readers_of_the_trackers_projects(
        engines: EngineFactory, bmc: FakeBugzilla, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    bmc.add_bug("Product", "Crash on start", status="CONFIRMED")
    bmc.add_bug("Product", "hidden", groups=["security"], bug_id=6)
    participant = Bugzilla()
    engine = await engines({}, registry=ParticipantRegistry([Echo(), participant]),
                           participant_env=ParticipantEnv(config={"bugzilla": configure(monkeypatch, bmc_tracker(bmc))}))
    users = [User("dev", irc={"net": IrcIds(("dev",))}, roles={"Project:Devel": frozenset({"dev"})}),
             User("out", irc={"net": IrcIds(("out",))}, roles={"Other": frozenset({"dev"})})]
    dispatcher = Dispatcher(engine, Directory(users), default_registry())

    async def say(who: str, text: str) -> list[str]:
        ident = Identity("irc", "net", who, account=who, verified_by=VERIFIED_SERVICES)
        return (await dispatcher.handle(Message(ident, text))).lines
    [line] = await say("dev", "bug bmc 1")
    assert line.startswith("bmc bug 1: CONFIRMED") and "Crash on start" in line
    assert "not authorised" in (await say("out", "bug bmc 1"))[0]
    assert "unknown tracker" in (await say("dev", "bug nope 1"))[0].lower() or \
        "nope" in (await say("dev", "bug nope 1"))[0]
    private = (await say("dev", "bug bmc 6"))[0]
    assert "6" in private and "Crash" not in private
    missing = (await say("dev", "bug bmc 99"))[0]
    assert "99" in missing
    assert "Usage: bug <tracker> <id>" in (await say("dev", "bug bmc x"))[0]
