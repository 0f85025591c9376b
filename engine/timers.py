"""Timers: SQLite holds every one (step timeouts, waits, retries, reminders,
schedules); APScheduler fires them in-process.

APScheduler is not the source of truth and does not hold every timer: it
holds one job, armed at the earliest due time found through the ``timers``
index.  When it fires, every timer due by then is handled as one batch (one
commit), and the job is re-armed at the next due time.  So restart cost and
memory stay flat however many instances wait, and nothing is ever dropped as
"missed": the job has no misfire grace limit, and a timer overdue at start
(the bot was down) fires once, at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable, Protocol

# re-exported: bot/config.py imports check_cron from here (engine.cron is the home)
from engine.cron import check_cron as check_cron
from engine.store import Store, TimerRow
from engine.timerops import ArmTimer, TimerOp

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """For tests: time moves only when told to."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# Where the alarm goes for a due time datetime cannot hold (a row written by an
# older bot, say): one unreachable timer must not stop every other from being
# armed, nor the bot from starting.  The row stays; ``show`` still lists it.
_LAST_ALARM = datetime(9000, 1, 1, tzinfo=timezone.utc)


def _alarm_time(due: float) -> datetime:
    try:
        return min(datetime.fromtimestamp(due, timezone.utc), _LAST_ALARM)
    except (ValueError, OverflowError, OSError):
        if due < 0:                     # long overdue: fire it now
            return datetime.now(timezone.utc)
        log.error("a timer is due at %r, beyond any date this bot can arm; it waits until %s",
                  due, _LAST_ALARM.date())
        return _LAST_ALARM


class TimerService:
    def __init__(self, store: Store, fire: Callable[[list[TimerRow]], Awaitable[None]],
                 clock: Clock, use_scheduler: bool = True, batch: int = 5000) -> None:
        self.store = store
        self._fire = fire
        self.clock = clock
        self.use_scheduler = use_scheduler
        self.batch = batch
        self._scheduler: Any = None
        self._armed: float | None = None
        self._lock = asyncio.Lock()
        self.fired = 0
        self.sweep_seconds = 30.0

    async def start(self) -> None:
        if self.use_scheduler:
            from apscheduler.schedulers.asyncio import AsyncIOScheduler

            scheduler = AsyncIOScheduler(
                event_loop=asyncio.get_running_loop(), timezone=timezone.utc,
                # never drop a run: no misfire grace limit, and no cap on runs that
                # overlap (APScheduler 3 *skips* a run of a job still running, and a
                # skipped date job is gone); fire_due serialises itself with its lock
                job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1_000_000})
            scheduler.start()
            from apscheduler.triggers.interval import IntervalTrigger

            scheduler.add_job(self._sweep, IntervalTrigger(seconds=self.sweep_seconds), id="engine-timers-sweep")
            self._scheduler = scheduler
        await self.rearm()

    async def _sweep(self) -> None:
        """Safety net: a timer overdue by more than a sweep means the alarm was
        lost somewhere; fire it and say so."""
        due = await self.store.next_due()
        if due is not None and due < self.clock.now() - self.sweep_seconds and not self._lock.locked():
            log.warning("timer due at %.3f was not fired by its alarm; firing it now", due)
            await self.fire_due()

    async def stop(self) -> None:
        """Let a batch being fired finish (it is one commit), then stop."""
        async with self._lock:
            if self._scheduler is not None and self._scheduler.running:
                self._scheduler.shutdown(wait=False)
            self._scheduler = None

    async def rearm(self) -> None:
        due = await self.store.next_due()
        self._armed = None
        if due is not None:
            self._arm(due)

    def notify(self, due: float) -> None:
        """A timer due at ``due`` was committed: arm earlier if needed."""
        if self._armed is None or due < self._armed:
            self._arm(due)

    def note(self, ops: Iterable[TimerOp]) -> None:
        """A transition's timer changes were committed: arm for the earliest new timer."""
        dues = [op.due for op in ops if isinstance(op, ArmTimer)]
        if dues:
            self.notify(min(dues))

    def _arm(self, due: float) -> None:
        self._armed = due
        if self._scheduler is None:
            return
        from apscheduler.triggers.date import DateTrigger

        self._scheduler.add_job(self.fire_due, DateTrigger(_alarm_time(due)),
                                id="engine-timers", replace_existing=True)

    @property
    def armed(self) -> float | None:
        return self._armed

    async def fire_due(self) -> int:
        """Handle every timer due now, in batches of one commit each; re-arm."""
        count = 0
        async with self._lock:
            self._armed = None
            while True:
                rows = await self.store.due_timers(self.clock.now(), self.batch)
                if rows:
                    try:
                        await self._fire(rows)
                    except Exception:
                        log.exception("firing %d timer(s) failed; retrying in 5 s", len(rows))
                        self._arm(self.clock.now() + 5)
                        return count
                    count += len(rows)
                if len(rows) < self.batch:
                    break
            self.fired += count
            due = await self.store.next_due()
            if due is not None and (self._armed is None or due < self._armed):
                self._arm(due)
        return count
