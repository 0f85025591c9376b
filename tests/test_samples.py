"""The shipped sample processes run as-is and produce their expected trace.

Traces live in tests/traces/<name>.trace, one history entry a line
("+seconds step event: detail").  UPDATE_TRACES=1 rewrites them after a
deliberate change; review the diff."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.config import load_config
from engine.engine import Engine
from engine.participants import ParticipantRegistry, Reply
from engine.timers import ManualClock
from participants import discover
from tests.engine_fixtures import EngineFactory

ROOT = Path(__file__).resolve().parent.parent
TRACES = Path(__file__).resolve().parent / "traces"


@pytest.fixture
async def engine(engines: EngineFactory) -> Engine:
    """The shipped conf/ and participants, on a manual clock."""
    registry = ParticipantRegistry(discover())
    config = load_config(ROOT / "conf", registry.names())
    return await engines(specs=config.specs, registry=registry)


async def trace(engine: Engine, iid: int) -> str:
    events = await engine.history(iid)
    start = events[0].at
    return "".join(f"+{e.at - start:g}s {e.step or 'process'} {e.event}" + (f": {e.detail}" if e.detail else "")
                   + "\n" for e in events)


def check(name: str, text: str) -> None:
    path = TRACES / f"{name}.trace"
    if os.environ.get("UPDATE_TRACES") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"trace of {name} changed; if intended, UPDATE_TRACES=1 and review"


async def advance(engine: Engine, seconds: float) -> None:
    assert isinstance(engine.clock, ManualClock)
    engine.clock.advance(seconds)
    await engine.timers.fire_due()
    await engine.idle()


async def test_hello(engine: Engine) -> None:
    iid = await engine.launch("hello", {"who": "release team"}, actor="admin")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "completed"
    assert (await engine.describe(iid)).fields == {"who": "release team", "echo": "Hello, release team!",
                                                  "greeted": True}
    check("hello", await trace(engine, iid))


async def test_parallel_checks(engine: Engine) -> None:
    iid = await engine.launch("parallel-checks", {}, actor="admin")
    await engine.idle()
    detail = await engine.describe(iid)
    assert detail.summary.status == "completed"
    assert detail.fields["verdict"] == "ready"
    assert detail.fields["project"] == "Project:Devel"
    assert detail.fields["passed"] == 3
    assert detail.fields["rpmlint_ok"] is True and detail.fields["licences_ok"] is True
    check("parallel-checks", await trace(engine, iid))


async def test_parallel_checks_failing_threshold_fails_the_instance(engine: Engine) -> None:
    iid = await engine.launch("parallel-checks", {"threshold": 4}, actor="admin")
    await engine.idle()
    summary = await engine.summary(iid)
    assert summary.status == "failed"
    assert summary.error.endswith("only 3 of 3 checks passed for Project:Devel (need 4)")


async def test_timed_release_times_out_and_goes_on(engine: Engine) -> None:
    iid = await engine.launch("timed-release", {}, actor="admin")
    await engine.idle()
    assert (await engine.summary(iid)).waiting_on == "grace-period waiting"
    await advance(engine, 2.9)
    assert (await engine.summary(iid)).waiting_on == "grace-period waiting"
    await advance(engine, 0.1)
    assert (await engine.summary(iid)).waiting_on == "window pending"
    await advance(engine, 2)        # the reminder
    await advance(engine, 3)        # the deadline
    detail = await engine.describe(iid)
    assert detail.summary.status == "completed"
    assert detail.fields["echo"] == "released (approved: no answer, deadline passed)"
    check("timed-release", await trace(engine, iid))


async def test_timed_release_answered_before_the_deadline(engine: Engine) -> None:
    iid = await engine.launch("timed-release", {}, actor="admin")
    await advance(engine, 3)
    [item] = await engine.pending("hold")
    await engine.reply(item.key, Reply.done({"approved": "yes"}), actor="alice")
    await engine.idle()
    detail = await engine.describe(iid)
    assert detail.summary.status == "completed"
    assert detail.fields["echo"] == "released (approved: yes)"
    assert detail.timers == []       # the reminder and the deadline went with the step
    check("timed-release-answered", await trace(engine, iid))
