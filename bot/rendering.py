"""How engine facts read in chat: times, instance listings, an instance's detail.

The engine returns data (``InstanceSummary``, ``InstanceDetail``, history
events); every front-end shows it through these functions, so a time or an
instance looks the same on IRC, XMPP, mail and the console.
"""
from __future__ import annotations

import time

from engine.engine import InstanceDetail, InstanceSummary, ScheduleInfo
from engine.events import Event


def when(ts: float | None) -> str:
    """A timestamp as UTC, to the second: ``2026-11-25 05:10:44Z``; ``-`` for none."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def status_text(s: InstanceSummary) -> str:
    """The status, with the outcome when there is one: ``completed, recovered``."""
    return f"{s.status}, {s.outcome}" if s.outcome else s.status


def summary_line(s: InstanceSummary) -> str:
    about = s.waiting_on or (s.handled if s.outcome else "")
    return (f"#{s.id} {s.process} {status_text(s)}" + (f" - {about}" if about else "")
            + f" (since {when(s.updated)})")


def detail_lines(detail: InstanceDetail) -> list[str]:
    s = detail.summary
    out = [f"#{s.id} {s.process}: {status_text(s)}" + (f" (project {s.project})" if s.project else "")
           + (f", subprocess of #{s.parent_id}" if s.parent_id else "")
           + f"; launched {when(s.created)}, updated {when(s.updated)}"]
    out.append("fields: " + (", ".join(f"{k}={v!r}" for k, v in detail.fields.items()) or "none"))
    out += [f"step {line}" for line in detail.steps]
    for what, step, due, fired in detail.timers:
        out.append(f"timer {what} on {step} at {when(due)}" + (" (fired, being delivered)" if fired else ""))
    if detail.children:
        out.append("subprocesses: " + ", ".join(f"#{c}" for c in detail.children))
    if s.error:
        out.append(f"error: {s.error}")
    if s.handled:
        out.append(f"recovered from: {s.handled}" if s.outcome else f"handled earlier: {s.handled}")
    return out


def history_line(e: Event) -> str:
    return (f"{when(e.at)} {e.step or 'process'} {e.event}" + (f" by {e.actor}" if e.actor else "")
            + (f": {e.detail}" if e.detail else ""))


def schedule_line(s: ScheduleInfo) -> str:
    return (f"{s.name}: {s.cron} -> {s.process}, next {when(s.next_due)}, last {when(s.last_run)}"
            f", misfire {s.misfire}")
