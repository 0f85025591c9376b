"""Freeze windows: a start (cron, in its time zone) and a duration.

Evaluated on the engine's clock (``services.clock``), so a test's manual
clock and the bot's schedules agree on what time it is.  A window is on at
``now`` when one of its starts falls in ``(now - duration, now]``; windows
that follow one another closely enough chain (the end is the last start's
end that begins before the previous one's end).
"""
from __future__ import annotations

from typing import Sequence

from engine.cron import next_cron
from participants.repo.config import Freeze

_CHAIN = 1000


def frozen_until(freezes: Sequence[Freeze], now: float) -> tuple[float, Freeze] | None:
    """The end of the freeze in force at ``now`` (the latest, if several), or None."""
    found: tuple[float, Freeze] | None = None
    for freeze in freezes:
        start = next_cron(freeze.cron, now - freeze.duration, freeze.timezone)
        if start > now:
            continue
        end = start + freeze.duration
        for _ in range(_CHAIN):
            following = next_cron(freeze.cron, start, freeze.timezone)
            if following >= end:
                break
            start, end = following, max(end, following + freeze.duration)
        if found is None or end > found[0]:
            found = (end, freeze)
    return found
