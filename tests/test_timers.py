"""Timers with the real APScheduler and the real clock: nothing is ever
dropped, including timers due while a batch is still being fired."""
from __future__ import annotations

import asyncio
import time

from engine.engine import Engine
from engine.participants import ParticipantRegistry
from engine.timers import SystemClock
from participants import discover
from tests.engine_fixtures import EngineFactory, close_engine

NAP = "name: nap\nsteps:\n  - wait: 200ms\n  - participant: echo\n"


async def make(engines: EngineFactory) -> Engine:
    return await engines({"nap": NAP}, registry=ParticipantRegistry(discover()), clock=SystemClock(),
                         use_scheduler=True)


async def wait_completed(engine: Engine, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await engine.instances(include_finished=True)
        if len(rows) == count and all(r.status == "completed" for r in rows):
            return [r.status for r in rows]
        await asyncio.sleep(0.02)
    return [r.status for r in await engine.instances(include_finished=True)]


async def test_timers_due_while_a_batch_is_firing_are_not_dropped(engines: EngineFactory) -> None:
    engine = await make(engines)
    # due times 0-2 ms apart: the job is re-armed for the next one while it is still
    # firing the previous one (APScheduler 3 skips, then forgets, a job already running)
    for i in range(100):
        await engine.launch("nap")
        await asyncio.sleep(0.0005 * (i % 5))
    assert await wait_completed(engine, 100, 5) == ["completed"] * 100


async def test_timer_overdue_at_start_fires_once_at_once(engines: EngineFactory) -> None:
    engine = await make(engines)
    iid = await engine.launch("nap")
    await close_engine(engine)               # down before the wait is over
    await asyncio.sleep(0.3)
    engine = await make(engines)
    assert await wait_completed(engine, 1, 2) == ["completed"]
    events = [e.event for e in await engine.history(iid)]
    assert events.count("wait over") == 1
