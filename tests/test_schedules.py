"""Cron schedules: they launch their process on time, survive restarts, and
a run missed while the bot was down is run once or skipped, as configured."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

import pytest

from engine.cron import next_cron
from engine.engine import Engine
from engine.participants import ParticipantRegistry
from engine.schedules import ScheduleSpec
from engine.timers import ManualClock
from participants import discover
from tests.engine_fixtures import EngineFactory, close_engine

HELLO = "name: hello\nsteps:\n  - participant: echo\n    params: {text: 'hi {{ who }}'}\n"
T0 = datetime(2026, 11, 25, 1, 30, tzinfo=timezone.utc).timestamp()   # 01:30 UTC
TWO_AM = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc).timestamp()
DAY = 86400


async def make(engines: EngineFactory, clock: ManualClock, misfire: str = "run_once", tz: str = "UTC") -> Engine:
    return await engines({"hello": HELLO}, registry=ParticipantRegistry(discover()), clock=clock,
                         schedules=[ScheduleSpec("nightly", "0 2 * * *", "hello", {"who": "night"}, misfire, tz)])


async def tick(engine: Engine, clock: ManualClock, seconds: float) -> None:
    clock.advance(seconds)
    await engine.timers.fire_due()
    await engine.idle()


def test_next_cron_is_strictly_after() -> None:
    assert next_cron("0 2 * * *", T0) == TWO_AM
    assert next_cron("0 2 * * *", TWO_AM) == TWO_AM + DAY
    assert next_cron("*/15 * * * *", T0 + 1) == T0 + 15 * 60


async def test_schedule_launches_at_its_time_and_rearms(engines: EngineFactory) -> None:
    clock = ManualClock(T0)
    engine = await make(engines, clock)
    [info] = await engine.schedules()
    assert (info.next_due, info.last_run) == (TWO_AM, None)
    assert engine.timers.armed == TWO_AM
    await tick(engine, clock, 29 * 60)
    assert await engine.instances(include_finished=True) == []
    await tick(engine, clock, 60)
    [run] = await engine.instances(include_finished=True)
    assert (run.process, run.status) == ("hello", "completed")
    assert (await engine.describe(run.id)).fields["echo"] == "hi night"
    assert (await engine.history(run.id))[0].actor == "schedule nightly"
    [info] = await engine.schedules()
    assert (info.next_due, info.last_run) == (TWO_AM + DAY, T0 + 30 * 60)


@pytest.mark.parametrize("misfire, launched", [("run_once", 1), ("skip", 0)])
async def test_runs_missed_while_down(engines: EngineFactory, caplog: pytest.LogCaptureFixture,
                                      misfire: str, launched: int) -> None:
    clock = ManualClock(T0)
    await close_engine(await make(engines, clock, misfire))
    clock.advance(3 * DAY)                        # down over three 02:00 runs
    caplog.set_level(logging.WARNING, "engine.schedules")
    engine = await make(engines, clock, misfire)
    await tick(engine, clock, 0)                  # what APScheduler does at once with an overdue job
    assert len(await engine.instances(include_finished=True)) == launched
    [info] = await engine.schedules()
    assert info.next_due == TWO_AM + 3 * DAY
    messages = [r.getMessage() for r in caplog.records]
    assert any("schedule nightly missed its run" in m and misfire in m for m in messages), messages


async def test_restart_before_due_keeps_the_schedule_without_launching(engines: EngineFactory) -> None:
    clock = ManualClock(T0)
    await close_engine(await make(engines, clock))
    engine = await make(engines, clock)
    assert await engine.instances(include_finished=True) == []
    [info] = await engine.schedules()
    assert info.next_due == TWO_AM


async def test_a_changed_time_zone_moves_the_next_run(engines: EngineFactory) -> None:
    clock = ManualClock(T0)
    await close_engine(await make(engines, clock))
    engine = await make(engines, clock, tz="Europe/Helsinki")       # UTC+2 in November
    [info] = await engine.schedules()
    assert info.next_due == TWO_AM + DAY - 2 * 3600                  # 02:00 Helsinki = 00:00 UTC tomorrow
    await close_engine(engine)
    engine = await make(engines, clock, tz="Europe/Helsinki")       # unchanged: kept as stored
    assert (await engine.schedules())[0].next_due == TWO_AM + DAY - 2 * 3600
