"""Engine fixtures (a pytest plugin, see tests/conftest.py), test-only
participants and helpers for engine tests.

The ``engines`` fixture is the one way tests build a Store and an Engine: a
real engine on a real SQLite file under ``tmp_path``, by default with a
``ManualClock`` and no APScheduler (time moves only through ``advance``).
Every engine it built is stopped, and its store closed, at the end of the
test.
"""
from __future__ import annotations

import asyncio
import sqlite3
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

import pytest

from engine.definitions import ProcessSpec, parse_definition
from engine.engine import Engine
from engine.events import Event
from engine.participant_runtime import ParticipantEnv
from engine.participants import Participant, ParticipantRegistry, Reply, Workitem
from engine.schedules import ScheduleSpec
from engine.store import Store
from engine.timers import Clock, ManualClock
from engine.yamlconfig import loads_yaml
from participants.builtin import Echo, Fail, Hold, Record, Sleep

START = 1_800_000_000.0          # ManualClock's default start: 2027-01-15 08:00:00 UTC
DB_NAME = "engine.sqlite3"


# -- test participants ---------------------------------------------------------

class Recorder(Participant):
    """Records every call the engine makes (``consume``, ``cancel``, ``on_timer``)
    in ``calls`` as ``(what, workitem, timer name or None)``.

    ``mode`` decides the answer and may be switched by the test at any time:
    ``done`` (with the ``fields`` param merged), ``fail`` (with the ``message``
    param), ``pending``, or ``block`` (consume never returns by itself: it
    waits on ``release``).  ``timer_reply`` is what ``on_timer`` returns."""

    def __init__(self, name: str = "rec", mode: str = "done") -> None:
        self.name = name  # type: ignore[misc]  # one class, many registered names
        self.mode = mode
        self.calls: list[tuple[str, Workitem, str | None]] = []
        self.release = asyncio.Event()
        self.timer_reply: Reply | None = None
        self.timer_ids: list[str] = []

    async def consume(self, workitem: Workitem) -> Reply:
        self.calls.append(("consume", workitem, None))
        mode = self.mode
        if mode == "block":
            await self.release.wait()
            return Reply.done(workitem.params.get("fields") or {})
        if mode == "pending":
            return Reply.pending()
        if mode == "fail":
            return Reply.failed(str(workitem.params.get("message", "boom")))
        return Reply.done(workitem.params.get("fields") or {})

    async def cancel(self, workitem: Workitem) -> None:
        self.calls.append(("cancel", workitem, None))

    async def on_timer(self, workitem: Workitem, name: str, timer_id: str) -> Reply | None:
        self.calls.append(("timer", workitem, name))
        self.timer_ids.append(timer_id)
        return self.timer_reply

    # views
    def consumed(self) -> list[Workitem]:
        return [w for what, w, _ in self.calls if what == "consume"]

    def cancelled(self) -> list[Workitem]:
        return [w for what, w, _ in self.calls if what == "cancel"]

    def timers(self) -> list[tuple[str, str]]:
        return [(w.key, name or "") for what, w, name in self.calls if what == "timer"]

    def kinds(self) -> list[str]:
        return [what for what, _w, _n in self.calls]


class DbProbe(Participant):
    """Looks into the SQLite file through its own connection while ``consume``
    runs: what has been committed before the participant was called?"""

    name = "probe"

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seen: list[dict[str, Any]] = []

    async def consume(self, workitem: Workitem) -> Reply:
        conn = sqlite3.connect(self.db)
        try:
            inst = conn.execute("SELECT status, runs FROM instances WHERE id = ?",
                                (workitem.instance_id,)).fetchone()
            item = conn.execute("SELECT state, participant, path FROM workitems WHERE key = ?",
                                (workitem.key,)).fetchone()
        finally:
            conn.close()
        self.seen.append({"key": workitem.key, "instance": inst, "workitem": item})
        return Reply.done()


# -- building engines --------------------------------------------------------------

def spec_from_yaml(stem: str, text: str, participants: frozenset[str] | None = None) -> ProcessSpec:
    source = textwrap.dedent(text)
    spec, problems = parse_definition(loads_yaml(source, f"{stem}.yaml"), f"{stem}.yaml", stem,
                                      participants, source)
    assert spec is not None and not problems, "\n".join(map(str, problems))
    return spec


async def make_engine(tmp_path: Path, definitions: Mapping[str, str] | None = None,
                      participants: Iterable[Participant] = (), *,
                      specs: Mapping[str, ProcessSpec] | None = None, registry: ParticipantRegistry | None = None,
                      clock: Clock | None = None, timezone: str = "UTC", db_name: str = DB_NAME,
                      schedules: Iterable[ScheduleSpec] = (), use_scheduler: bool = False,
                      participant_env: ParticipantEnv | None = None) -> Engine:
    """A started engine over ``tmp_path/db_name``; what ``engines`` builds."""
    if registry is None:
        registry = ParticipantRegistry([Echo(), Fail(), Hold(), Record(), Sleep()])
    for participant in participants:
        registry.add(participant)
    all_specs = dict(specs or {})
    for stem, text in (definitions or {}).items():
        spec = spec_from_yaml(stem, text, registry.names())
        all_specs[spec.name] = spec
    store = Store(tmp_path / db_name)
    store.open()
    engine = Engine(store, all_specs, registry, clock=clock or ManualClock(), use_scheduler=use_scheduler,
                    timezone=timezone, schedules=schedules, participant_env=participant_env)
    await engine.start()
    return engine


async def close_engine(engine: Engine) -> None:
    await engine.stop()
    await asyncio.to_thread(engine.store.close)


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[EngineFactory]:
    """A factory of started engines, each over a real SQLite file in ``tmp_path``:

    ``await engines({"name": yaml}, participants=[...], clock=..., timezone=...)``

    ``definitions`` (``{file stem: YAML text}``) are parsed against the
    participants' names.  Participants are the builtin test set (echo, fail,
    hold, record, sleep) plus ``participants``.  Keywords:

    ``specs``          pre-parsed ``{name: ProcessSpec}``, e.g. ``config.specs`` of the shipped conf/
    ``registry``       a ``ParticipantRegistry`` to use instead of the builtin set, e.g.
                       ``ParticipantRegistry(discover())``; ``participants`` are added to it
    ``clock``          default a new ``ManualClock``; ``SystemClock()`` for real time
    ``timezone``       the engine's time zone (``wait: {until: ...}``), default UTC
    ``db_name``        the database file in ``tmp_path``, default ``engine.sqlite3``: a second
                       engine on the same name reopens the database (close the first one
                       with ``close_engine`` before)
    ``schedules``      ``ScheduleSpec``s to keep
    ``use_scheduler``  fire timers with the real APScheduler (default False: ``advance`` does)
    ``participant_env`` participants' checked config sections and the user directory

    Every engine built is stopped, and its store closed, after the test."""
    built: list[Engine] = []

    async def factory(definitions: Mapping[str, str] | None = None, participants: Iterable[Participant] = (),
                      **kwargs: Any) -> Engine:
        engine = await make_engine(tmp_path, definitions, participants, **kwargs)
        built.append(engine)
        return engine

    yield factory
    for engine in built:
        if engine.store._writer is not None:   # not closed by the test itself
            await close_engine(engine)


# -- driving and observing -----------------------------------------------------------

async def advance(engine: Engine, seconds: float) -> None:
    """Move the manual clock, fire every timer now due (also those that
    firing makes due), and let the engine settle."""
    clock = engine.clock
    assert isinstance(clock, ManualClock)
    clock.advance(seconds)
    await engine.idle()
    while await engine.timers.fire_due():
        await engine.idle()
    await engine.idle()


async def status(engine: Engine, iid: int) -> str:
    return (await engine.summary(iid)).status


async def fields(engine: Engine, iid: int) -> dict[str, Any]:
    return dict((await engine.describe(iid)).fields)


async def trace(engine: Engine, iid: int) -> list[tuple[str, str]]:
    """(step name, event) of the history, in order; the instance itself is ''."""
    return [(e.step, e.event) for e in await engine.history(iid)]


async def events(engine: Engine, iid: int, event: str) -> list[Event]:
    return [e for e in await engine.history(iid) if e.event == event]


async def timers(engine: Engine, iid: int) -> list[tuple[str, str, float, bool]]:
    """(what, step name, due, fired) of the instance's timers, by due time."""
    return list((await engine.describe(iid)).timers)
