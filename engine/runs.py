"""Step runs: what an instance keeps for each step that is under way.

An instance holds one ``StepRun`` per active step (``Instance.runs``, keyed by
the step's path).  They are stored as JSON in the ``runs`` column of
``instances``, one object per run, with the one-letter keys every database
already holds; the readable names are for the code only:

    s     state          RunState value
    g     generation     unique per start of the step, so stale replies and notes are recognised
    a     attempt        automatic retries so far (on_error: retry); absent when 0
    i     position       sequence: the child running; repeat: iterations done
    k     key            dispatch key of the step's open workitem
    c     child          the subprocess (or error handler) instance waited on
    bf    branch_fields  concurrence: each branch's fields, by branch number;
                         for_each: each running body's fields, by item number
    done  branches_done  concurrence, for_each: the branches (bodies) finished, in order
    e     error          why the step failed
    t     has_timers     1 when timers were armed for the step, so they go with it
    it    items          for_each: the items, as evaluated when it started
    res   results        for_each: each finished body's changed fields, by item number
    h     handling       on_error/on_timeout handler: what it was told and where the work
                         stopped ({process, message, step, path, kind}), kept until the
                         step is done, so that a retry resumes there and "retry handler"
                         can tell a new handler the same

for_each: ``position`` is the next item to start.
``SUSPENDED``: work stopped while an enclosing step's error handler runs; a
retry starts it again where it stood.

Adding a field: give it a default, write it in ``to_json`` under a new short
key only when it is not the default, read it in ``from_json`` with the default
when the key is absent, and add a line to the table above.  Rows written
before the field existed then load unchanged: no migration.
tests/test_engine_runs.py fails until the new field has a sample value there
that survives the round trip.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping


class RunState(str, enum.Enum):
    ACTIVE = "active"            # a composite step whose children run
    DISPATCHED = "dispatched"    # with a participant right now
    PENDING = "pending"          # the participant holds it and answers later
    WAITING = "waiting"          # for a timer or a subprocess
    BACKOFF = "backoff"          # waiting to be retried
    HANDLING = "handling"        # an error handler (subprocess) runs for it
    FAILED = "failed"            # failed with no handler: waits for a retry
    SUSPENDED = "suspended"      # stopped while an enclosing error handler runs; a retry restarts it


@dataclass(slots=True)
class StepRun:
    state: RunState
    generation: int
    attempt: int = 0
    position: int | None = None
    key: str | None = None
    child: int | None = None
    branch_fields: dict[int, dict[str, Any]] | None = None
    branches_done: list[int] | None = None
    error: str = ""
    has_timers: bool = False
    items: list[Any] | None = None
    results: dict[int, dict[str, Any]] | None = None
    handling: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The stored form: defaults left out, as they always were."""
        out: dict[str, Any] = {"s": self.state.value, "g": self.generation}
        if self.attempt:
            out["a"] = self.attempt
        if self.position is not None:
            out["i"] = self.position
        if self.key is not None:
            out["k"] = self.key
        if self.child is not None:
            out["c"] = self.child
        if self.branch_fields is not None:
            out["bf"] = self.branch_fields    # JSON writes the int keys as strings
        if self.branches_done is not None:
            out["done"] = self.branches_done
        if self.error:
            out["e"] = self.error
        if self.has_timers:
            out["t"] = 1
        if self.items is not None:
            out["it"] = self.items
        if self.results is not None:
            out["res"] = self.results         # int keys written as strings, as for "bf"
        if self.handling is not None:
            out["h"] = self.handling
        return out

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> StepRun:
        bf = raw.get("bf")
        res = raw.get("res")
        return StepRun(
            state=RunState(raw["s"]),
            generation=raw["g"],
            attempt=raw.get("a", 0),
            position=raw.get("i"),
            key=raw.get("k"),
            child=raw.get("c"),
            branch_fields=None if bf is None else {int(b): fields for b, fields in bf.items()},
            branches_done=raw.get("done"),
            error=raw.get("e", ""),
            has_timers=bool(raw.get("t")),
            items=raw.get("it"),
            results=None if res is None else {int(i): fields for i, fields in res.items()},
            handling=raw.get("h"),
        )


def runs_to_json(runs: Mapping[str, StepRun]) -> dict[str, dict[str, Any]]:
    return {path: run.to_json() for path, run in runs.items()}


def runs_from_json(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, StepRun]:
    return {path: StepRun.from_json(run) for path, run in raw.items()}
