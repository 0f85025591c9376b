"""Timers with the real APScheduler and the real clock: nothing is ever
dropped, including timers due while a batch is still being fired."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from engine.definitions import parse_definition
from engine.engine import Engine
from engine.participants import ParticipantRegistry
from engine.yamlconfig import loads_yaml
from engine.store import Store
from participants import discover

NAP = "name: nap\nsteps:\n  - wait: 200ms\n  - participant: echo\n"


async def make(tmp_path: Path) -> Engine:
    registry = ParticipantRegistry(discover())
    spec, problems = parse_definition(loads_yaml(NAP, "nap.yaml"), "nap.yaml", "nap", registry.names())
    assert spec and not problems
    store = Store(tmp_path / "bot.sqlite3")
    store.open()
    engine = Engine(store, {"nap": spec}, registry)
    await engine.start()
    return engine


async def wait_completed(engine: Engine, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await engine.instances(include_finished=True)
        if len(rows) == count and all(r.status == "completed" for r in rows):
            return [r.status for r in rows]
        await asyncio.sleep(0.02)
    return [r.status for r in await engine.instances(include_finished=True)]


async def test_timers_due_while_a_batch_is_firing_are_not_dropped(tmp_path: Path) -> None:
    engine = await make(tmp_path)
    # due times 0-2 ms apart: the job is re-armed for the next one while it is still
    # firing the previous one (APScheduler 3 skips, then forgets, a job already running)
    for i in range(100):
        await engine.launch("nap")
        await asyncio.sleep(0.0005 * (i % 5))
    assert await wait_completed(engine, 100, 5) == ["completed"] * 100
    await engine.stop()
    engine.store.close()


async def test_timer_overdue_at_start_fires_once_at_once(tmp_path: Path) -> None:
    engine = await make(tmp_path)
    iid = await engine.launch("nap")
    await engine.stop()                      # down before the wait is over
    engine.store.close()
    await asyncio.sleep(0.3)
    engine = await make(tmp_path)
    assert await wait_completed(engine, 1, 2) == ["completed"]
    events = [e.event for e in await engine.history(iid)]
    assert events.count("wait over") == 1
    await engine.stop()
    engine.store.close()
