"""Cron schedules: what launches a process at fixed times (``ScheduleSpec``,
from configuration) and how the engine keeps them (``Schedules``).

Each schedule has a row in ``schedules`` (its rule and last run) and one
timer (owner ``SCHEDULE_OWNER``, path = its name) due at its next run.  At
start the timers are brought in line with the configuration: a new or changed
schedule (cron or time zone) is armed afresh, one no longer configured is
forgotten, and a run missed while the bot was down is run once or skipped, as
its ``misfire`` says.  A run launches its process and moves the timer on in one
commit, so a crash neither loses a run nor makes it twice; and the launch
carries the token ``schedule NAME DUE`` (DUE: the run's due time, in epoch
seconds), so one run is launched at most once whatever happens.

Only configuration values are needed to parse the configuration: the store
and the timer service are imported for type checking only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from time import gmtime, strftime
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping, Sequence

from engine.cron import next_cron
from engine.errors import AlreadyLaunched, UnknownProcess

if TYPE_CHECKING:
    from engine.store import Op, Store, TimerRow
    from engine.timers import Clock, TimerService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    cron: str
    process: str
    fields: Mapping[str, Any]
    misfire: str = "run_once"     # run_once | skip: what to do with a run missed while down
    timezone: str = "UTC"

    @property
    def rule(self) -> str:
        """What decides the run times; stored, so a changed cron or time zone re-arms."""
        return self.cron if self.timezone == "UTC" else f"{self.cron} ({self.timezone})"


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    cron: str
    process: str
    misfire: str
    next_due: float | None
    last_run: float | None


# Launch ``process`` with ``fields`` as ``actor``, writing ``extra`` in the same commit,
# once per ``token``; the new instance's id.  Raises UnknownProcess, AlreadyLaunched.
Launcher = Callable[[str, Mapping[str, Any], str, Sequence["Op"], str], Awaitable[int]]


class Schedules:
    def __init__(self, specs: Iterable[ScheduleSpec], store: Store, timers: TimerService, clock: Clock,
                 launch: Launcher) -> None:
        self.specs = {s.name: s for s in specs}
        self.store = store
        self.timers = timers
        self.clock = clock
        self._launch = launch

    async def sync(self) -> None:
        """At start: arm new and changed schedules, forget removed ones, and
        deal with runs missed while the bot was down (before the timers start)."""
        stored = await self.store.schedules()
        due = await self.store.schedule_timers()
        now = self.clock.now()
        ops: list[Op] = []
        for spec in self.specs.values():
            known = stored.get(spec.name)
            when = due.get(spec.name)
            if known is None or known[0] != spec.rule or when is None:
                nxt = next_cron(spec.cron, now, spec.timezone)
                ops += self.store.schedule_ops(spec.name, spec.rule, None, nxt)
                log.info("schedule %s (%s -> %s): next run %s", spec.name, spec.rule, spec.process, _iso(nxt))
            elif when <= now:
                if spec.misfire == "run_once":
                    log.warning("schedule %s missed its run at %s while the bot was down; "
                                "running it once now (misfire: run_once)", spec.name, _iso(when))
                else:
                    nxt = next_cron(spec.cron, now, spec.timezone)
                    ops += self.store.schedule_ops(spec.name, spec.rule, None, nxt)
                    log.warning("schedule %s missed its run at %s while the bot was down; skipped "
                                "(misfire: skip); next run %s", spec.name, _iso(when), _iso(nxt))
        for name in stored:
            if name not in self.specs:
                ops += self.store.schedule_forget_op(name)
                log.info("schedule %s is no longer configured; forgotten", name)
        if ops:
            await self.store.commit(ops)

    async def fire(self, row: TimerRow) -> None:
        """A schedule's timer is due: launch its process and move the timer on."""
        spec = self.specs.get(row.path)
        if spec is None:
            await self.store.commit(self.store.schedule_forget_op(row.path))
            return
        now = self.clock.now()
        nxt = next_cron(spec.cron, now, spec.timezone)
        try:
            iid = await self._launch(spec.process, spec.fields, f"schedule {spec.name}",
                                     self.store.schedule_ops(spec.name, spec.rule, now, nxt),
                                     f"schedule {spec.name} {row.due:.0f}")
        except UnknownProcess:
            log.error("schedule %s: process %r is not defined; skipped", spec.name, spec.process)
            await self.store.commit(self.store.schedule_ops(spec.name, spec.rule, None, nxt))
            return
        except AlreadyLaunched as exc:
            log.warning("schedule %s: the run due %s was launched already (#%d); not again", spec.name,
                        _iso(row.due), exc.instance_id)
            await self.store.commit(self.store.schedule_ops(spec.name, spec.rule, None, nxt))
            self.timers.notify(nxt)
            return
        self.timers.notify(nxt)
        log.info("#%d %s launched by schedule %s (late by %.1f s); next run %s", iid, spec.process,
                 spec.name, max(0.0, now - row.due), _iso(nxt))

    async def info(self) -> list[ScheduleInfo]:
        stored = await self.store.schedules()
        due = await self.store.schedule_timers()
        return [ScheduleInfo(s.name, s.cron, s.process, s.misfire, due.get(s.name),
                             stored.get(s.name, ("", None))[1]) for s in self.specs.values()]


def _iso(ts: float) -> str:
    return strftime("%Y-%m-%d %H:%M:%SZ", gmtime(ts))
