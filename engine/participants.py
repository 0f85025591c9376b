"""The participant contract: a workflow step's worker.

``consume`` gets a ``Workitem`` and answers with a ``Reply``: done (with
fields to merge), failed (error text), or pending -- the participant keeps
the workitem and answers later through ``Engine.reply(key, ...)`` (human
approvals, remote work).  ``key`` is stable across re-dispatch after a crash,
so a participant with side effects uses it to act at most once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping


@dataclass(frozen=True)
class Workitem:
    key: str                  # dispatch key: instance:path:generation; stable across re-dispatch
    instance_id: int
    process: str
    path: str
    step: str                 # the step's name as people see it
    participant: str
    params: Mapping[str, Any]
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Reply:
    kind: str                 # "done" | "failed" | "pending"
    fields: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""

    @staticmethod
    def done(fields: Mapping[str, Any] | None = None) -> "Reply":
        return Reply("done", dict(fields or {}))

    @staticmethod
    def failed(error: str) -> "Reply":
        return Reply("failed", error=error or "failed")

    @staticmethod
    def pending() -> "Reply":
        return Reply("pending")


class Participant:
    """Base class.  Subclasses set ``name`` and implement ``consume``."""

    name: ClassVar[str] = ""

    async def setup(self, engine: Any) -> None:
        """Called once before any workitem; ``engine`` is for later replies."""

    async def shutdown(self) -> None:
        """Called once at clean shutdown."""

    async def consume(self, workitem: Workitem) -> Reply:
        raise NotImplementedError

    async def on_timer(self, workitem: Workitem, name: str, timer_id: str) -> Reply | None:
        """A named step timer fired (``timers: "4h: remind, 8h: remind, 1d: escalate"``:
        a name given twice fires twice, in due order).  Delivered at least once
        per timer (again after a crash before its end was recorded): ``timer_id``
        is the same on every delivery of one timer and differs between the two
        ``remind`` timers, so a participant can act once per timer.  Return a
        done or failed Reply to answer the step."""
        return None

    async def cancel(self, workitem: Workitem) -> None:
        """The step was cancelled (instance cancelled, timeout, branch lost a race)."""


class ParticipantRegistry:
    def __init__(self, participants: list[Participant] | None = None) -> None:
        self._by_name: dict[str, Participant] = {}
        for p in participants or ():
            self.add(p)

    def add(self, participant: Participant) -> None:
        if not participant.name:
            raise ValueError(f"{type(participant).__name__} has no name")
        if participant.name in self._by_name:
            raise ValueError(f"participant {participant.name!r} registered twice")
        self._by_name[participant.name] = participant

    def get(self, name: str) -> Participant | None:
        return self._by_name.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def all(self) -> list[Participant]:
        return list(self._by_name.values())
