"""Crontab expressions: checked when configuration is read, evaluated when a
schedule is armed.  Apart from the timer service, so configuration parsing
never imports the engine's runtime."""
from __future__ import annotations

from datetime import datetime, timezone


def next_cron(cron: str, after: float, tz: str = "UTC") -> float:
    """The first fire time of a crontab expression strictly after ``after``."""
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron, timezone=tz)
    start = datetime.fromtimestamp(after, timezone.utc)
    nxt = trigger.get_next_fire_time(None, start)
    if nxt is not None and nxt.timestamp() <= after:
        nxt = trigger.get_next_fire_time(nxt, datetime.fromtimestamp(after + 1, timezone.utc))
    if nxt is None:
        raise ValueError(f"cron {cron!r} never fires")
    fire_time: datetime = nxt
    return fire_time.timestamp()


def check_cron(cron: str, tz: str = "UTC") -> str | None:
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(cron, timezone=tz)
    except Exception as exc:  # APScheduler raises ValueError and friends
        return f"bad cron expression {cron!r}: {exc}"
    return None
