"""Timer changes as a transition records them: which timer (``TimerKey``) and
what happens to it (``ArmTimer``, ``DropTimer``, ``DropStepTimers``,
``MarkFired``).  Plain values: the store turns them into SQL and the timer
service arms its alarm for the earliest new one, so the state machine needs
to know neither the table nor the scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass

# The instance id of schedule timers: no instance owns them (``path`` is the schedule's name).
SCHEDULE_OWNER = 0


@dataclass(frozen=True)
class TimerKey:
    instance_id: int
    path: str
    kind: str        # timeout | wait | retry | event | schedule
    name: str = ""   # event timers: the name, plus "#N" for its Nth use in one step

    @property
    def event(self) -> str:
        """What the participant is told: the name as the definition gives it."""
        return event_name(self.name)


def event_name(stored: str) -> str:
    """'remind#2' (the second 'remind' of a step) -> 'remind'."""
    return stored.partition("#")[0]


@dataclass(frozen=True)
class ArmTimer:
    """Add the timer (or move it) to fire at ``due``."""
    key: TimerKey
    due: float


@dataclass(frozen=True)
class DropTimer:
    key: TimerKey


@dataclass(frozen=True)
class DropStepTimers:
    """Every timer of one step: the step finished or was cancelled."""
    instance_id: int
    path: str


@dataclass(frozen=True)
class MarkFired:
    """An event timer fired; it stays until its participant has been told (at least once)."""
    key: TimerKey


TimerOp = ArmTimer | DropTimer | DropStepTimers | MarkFired
