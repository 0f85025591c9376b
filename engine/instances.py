"""Process instances: the state machine that walks a ``ProcessSpec``.

Pure: no I/O, no clock of its own.  Every entry point runs inside a
``Transition`` and records there what must be written (instance rows,
workitems, timers, history) and what must be done after the commit
(dispatch, cancel, launch or notify other instances).  ``Engine`` commits a
transition, then announces it.

An instance keeps one *run* per active step in ``runs`` (path -> small dict,
stored as JSON): ``s`` state, ``g`` generation (unique per start, so stale
replies and notifications are recognised), ``a`` attempt, ``i`` position,
``k`` dispatch key, ``c`` child instance id, ``bf``/``done`` for concurrence.
"""
from __future__ import annotations

import copy
import enum
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Mapping

from engine.definitions import ProcessSpec, StepSpec
from engine.errors import NotAllowedNow
from engine.events import Event
from engine.participants import Reply, Workitem
from engine.durations import MAX_DURATION, MAX_DURATION_TEXT
from engine.templating import TemplateProblem, evaluate, render


class Status(str, enum.Enum):
    RUNNING = "running"        # some step is with a participant right now
    WAITING = "waiting"        # waiting for a human, a timer or a subprocess
    FAILED = "failed"          # a step failed with no handler: fix, then retry
    COMPLETED = "completed"
    TERMINATED = "terminated"  # ended early by a terminate step
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({Status.COMPLETED, Status.TERMINATED, Status.CANCELLED})
ACTIVE = frozenset({Status.RUNNING, Status.WAITING, Status.FAILED})

# Run states
DISPATCHED, PENDING, ACTIVE_RUN, WAITING, BACKOFF, HANDLING, FAILED_RUN = (
    "dispatched", "pending", "active", "waiting", "backoff", "handling", "failed")


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


@dataclass
class Launch:
    """A new instance to create in the same transition (a subprocess)."""
    instance_id: int
    process: str
    fields: dict[str, Any]
    parent: tuple[int, str] | None
    actor: str


@dataclass
class ChildFinished:
    parent_id: int
    parent_path: str
    child_id: int
    ok: bool
    fields: dict[str, Any]
    error: str


@dataclass
class CancelInstance:
    instance_id: int
    actor: str


@dataclass
class Transition:
    """Everything one unit of work writes (atomically) and then announces."""

    now: float
    allocate_id: Any                       # () -> int, for subprocess instances
    tz: tzinfo = timezone.utc              # for "wait: {until: '02:00'}"
    touched: dict[int, "Instance"] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    dispatch: list[Workitem] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)     # workitems whose participant must be told
    # timer changes in the order they happened: ("add", key, due), ("del", key),
    # ("del_step", (instance, path)), ("fired", key)
    timer_ops: list[tuple[str, Any, float]] = field(default_factory=list)
    deliveries: list[tuple[TimerKey, str]] = field(default_factory=list)  # event timer -> dispatch key
    followups: deque[Launch | ChildFinished | CancelInstance] = field(default_factory=deque)
    extra: list[Any] = field(default_factory=list)          # store-level ops (schedules)


class Instance:
    __slots__ = ("id", "spec", "fields", "status", "runs", "parent", "project", "created",
                 "updated", "serial", "error", "tx", "_queue")

    def __init__(self, iid: int, spec: ProcessSpec, fields: dict[str, Any], *,
                 status: Status = Status.RUNNING, runs: dict[str, dict[str, Any]] | None = None,
                 parent: tuple[int, str] | None = None, project: str | None = None,
                 created: float = 0.0, updated: float = 0.0, serial: int = 0,
                 error: str = "") -> None:
        self.id = iid
        self.spec = spec
        self.fields = fields
        self.status = status
        self.runs = runs if runs is not None else {}
        self.parent = parent
        self.project = project
        self.created = created
        self.updated = updated
        self.serial = serial
        self.error = error
        self.tx: Transition | None = None
        self._queue: deque[tuple[str, int, StepSpec]] = deque()

    # -- entry points -----------------------------------------------------------

    def start(self, tx: Transition, actor: str) -> None:
        self._begin(tx)
        self._history(None, "launched", actor, _brief(self.fields))
        self._start(self.spec.root)
        self._end()

    def on_reply(self, tx: Transition, path: str, key: str, reply: Reply, actor: str = "") -> bool:
        """Apply a participant's answer; False if the workitem is no longer open."""
        run = self.runs.get(path)
        if run is None or run.get("k") != key or run["s"] not in (DISPATCHED, PENDING):
            return False
        self._begin(tx)
        step = self.spec.steps[path]
        tx.closed.append(key)
        del run["k"]
        if reply.kind == "done":
            self._scope(step).update(reply.fields)
            self._history(step, "done", actor, _brief(reply.fields))
            self._finish(step)
        else:
            self._fail(step, reply.error or "failed", actor)
        self._end()
        return True

    def on_pending(self, tx: Transition, path: str, key: str) -> bool:
        run = self.runs.get(path)
        if run is None or run.get("k") != key or run["s"] != DISPATCHED:
            return False
        self._begin(tx)
        run["s"] = PENDING
        tx.pending.append(key)
        self._history(self.spec.steps[path], "pending")
        self._end()
        return True

    def on_timer(self, tx: Transition, timer: TimerKey) -> None:
        """A timer of this instance is due.  An event timer for a live step is
        queued in ``tx.deliveries`` for its participant."""
        self._begin(tx)
        run = self.runs.get(timer.path)
        step = self.spec.steps.get(timer.path)
        if timer.kind == "event":
            # an event timer stays (marked fired) until the participant has it: at-least-once
            if run is not None and step is not None and run["s"] in (DISPATCHED, PENDING):
                self._history(step, f"timer {timer.event}")
                tx.timer_ops.append(("fired", timer, 0.0))
                tx.deliveries.append((timer, run["k"]))
            else:
                tx.timer_ops.append(("del", timer, 0.0))
            self._end()
            return
        tx.timer_ops.append(("del", timer, 0.0))   # before anything re-arms the same timer
        if run is not None and step is not None:
            if timer.kind == "timeout" and run["s"] not in (FAILED_RUN, BACKOFF, HANDLING):
                self._timeout(step, run)
            elif timer.kind == "wait" and run["s"] == WAITING and step.kind == "wait":
                self._history(step, "wait over")
                self._finish(step)
            elif timer.kind == "retry" and run["s"] == BACKOFF:
                self._history(step, "retrying", detail=f"attempt {run.get('a', 0) + 1}")
                self._start(step, run.get("a", 0))
        self._end()

    def on_child_finished(self, tx: Transition, note: ChildFinished) -> None:
        run = self.runs.get(note.parent_path)
        if run is None or run.get("c") != note.child_id:
            return  # the step moved on (cancelled, retried): nothing waits for this child
        self._begin(tx)
        step = self.spec.steps[note.parent_path]
        if note.ok:
            del run["c"]
            what = "handler" if run["s"] == HANDLING else "subprocess"
            fields = note.fields
            if what == "handler":
                # ``error`` described the failure to the handler; the failure is dealt
                # with, so it must not linger to mislead a later condition or handler
                # (the history keeps it)
                fields = {k: v for k, v in fields.items() if k != "error"}
            self._scope(step).update(fields)
            self._history(step, f"{what} done", detail=f"#{note.child_id}")
            self._finish(step)
        elif run["s"] != FAILED_RUN:
            message = f"subprocess #{note.child_id} {note.error}"
            if run["s"] == HANDLING:
                # the handler stays tracked: retrying the step cancels it, and retrying
                # the handler itself resumes the step
                self._fail(step, message, start=self.spec.parent(step.path), keep_child=True)
            else:
                self._fail(step, message, keep_child=True)
        self._end()

    def cancel(self, tx: Transition, actor: str) -> None:
        if self.status in FINISHED:
            raise NotAllowedNow(f"#{self.id} is already {self.status.value}")
        self._begin(tx)
        self._cancel_below("", drop=True)
        self.status = Status.CANCELLED
        self._history(None, "cancelled", actor)
        if self.parent:
            tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, False, {}, "was cancelled"))
        self._end()

    def retry(self, tx: Transition, actor: str, fields: Mapping[str, Any] | None = None) -> list[str]:
        """Start the failed steps again.  ``fields`` are the fix, when the fix is
        data (a missing or wrong field): set where each failed step reads them."""
        failed = [p for p, r in self.runs.items() if r["s"] == FAILED_RUN]
        if not failed:
            raise NotAllowedNow(f"#{self.id} has no failed step to retry (it is {self.status.value})")
        self._begin(tx)
        names = []
        for path in failed:
            step = self.spec.steps[path]
            self._cancel_below(path, drop=False)
            if fields:
                self._scope(step).update(fields)
            self._history(step, "retried", actor, _brief(dict(fields)) if fields else "")
            names.append(step.name)
            self._start(step)   # after a fix, on_error's automatic retries start afresh
        self.error = ""
        self._end()
        return names

    # -- views -----------------------------------------------------------------

    def active_steps(self) -> list[tuple[StepSpec, dict[str, Any]]]:
        """Leaf runs: what the instance waits on now."""
        out = []
        for path, run in self.runs.items():
            if run["s"] != ACTIVE_RUN:
                out.append((self.spec.steps[path], run))
        return out

    def waiting_on(self) -> str:
        parts = []
        for step, run in self.active_steps():
            what = {DISPATCHED: "running", PENDING: "pending", WAITING: "waiting",
                    BACKOFF: "retry backoff", HANDLING: "error handler", FAILED_RUN: "failed"}[run["s"]]
            parts.append(f"{step.name} {what}" + (f": {run['e']}" if run.get("e") else ""))
        return "; ".join(parts)

    def scope_fields(self, step: StepSpec) -> dict[str, Any]:
        return self._scope(step)

    # -- internals ---------------------------------------------------------------

    def _begin(self, tx: Transition) -> None:
        self.tx = tx
        tx.touched[self.id] = self

    def _end(self) -> None:
        while self._queue:
            ppath, gen, child = self._queue.popleft()
            prun = self.runs.get(ppath)
            if prun is not None and prun["g"] == gen and prun["s"] == ACTIVE_RUN:
                self._child_done(self.spec.steps[ppath], prun, child)
        if self.error and self.status is not Status.CANCELLED and not any(
                r["s"] == FAILED_RUN for r in self.runs.values()):
            self.error = ""   # the failure it described is gone (retried, skipped, branch dropped)
        if self.status not in FINISHED:
            states = {r["s"] for r in self.runs.values()}
            if FAILED_RUN in states:
                self.status = Status.FAILED
            elif DISPATCHED in states:
                self.status = Status.RUNNING
            else:
                self.status = Status.WAITING
        assert self.tx is not None
        self.updated = self.tx.now

    def _history(self, step: StepSpec | None, event: str, actor: str = "", detail: str = "") -> None:
        assert self.tx is not None
        self.tx.history.append(Event(self.id, self.spec.name, self.tx.now, step.path if step else "",
                                            step.name if step else "", event, actor, detail))

    def _scope(self, step: StepSpec) -> dict[str, Any]:
        if step.scope is None:
            return self.fields
        cpath, branch = step.scope
        return self.runs[cpath]["bf"][str(branch)]

    def _timer(self, path: str, kind: str, due: float, name: str = "") -> None:
        assert self.tx is not None
        self.tx.timer_ops.append(("add", TimerKey(self.id, path, kind, name), due))
        self.runs[path]["t"] = 1

    def _start(self, step: StepSpec, attempt: int = 0) -> None:
        assert self.tx is not None
        self.serial += 1
        run: dict[str, Any] = {"s": ACTIVE_RUN, "g": self.serial}
        if attempt:
            run["a"] = attempt
        self.runs[step.path] = run
        if step.timeout is not None:
            self._timer(step.path, "timeout", self.tx.now + step.timeout)
        kind = step.kind
        try:
            if kind == "sequence":
                run["i"] = 0
                self._start(step.children[0])
            elif kind == "participant":
                self._dispatch(step, run)
            elif kind == "concurrence":
                scope = self._scope(step)
                run["bf"] = {str(i): copy.deepcopy(scope) for i in range(len(step.children))}
                run["done"] = []
                for child in step.children:
                    if self.runs.get(step.path) is not run:
                        break
                    self._start(child)
            elif kind == "if":
                if evaluate(step.condition or "false", self._scope(step)):
                    self._start(step.children[0])
                elif len(step.children) > 1:
                    self._start(step.children[1])
                else:
                    self._finish(step)
            elif kind == "wait":
                run["s"] = WAITING
                self._timer(step.path, "wait", self._wait_due(step))
            elif kind == "repeat":
                run["i"] = 0
                self._start(step.children[0])
            elif kind == "subprocess":
                run["s"] = WAITING
                fields = dict(self._scope(step))
                fields.update(render(step.params or {}, fields))
                self._launch_child(step, step.process or "", fields, run)
            elif kind == "set":
                scope = self._scope(step)
                values = render(step.params, scope)
                scope.update(values)
                self._history(step, "set", detail=_brief(values))
                self._finish(step)
            elif kind == "terminate":
                self._terminate(step, str(render(step.params, self._scope(step))))
            elif kind == "error":
                self._fail(step, str(render(step.params, self._scope(step))))
        except TemplateProblem as exc:
            if step.path in self.runs:
                self._fail(step, str(exc))

    def _dispatch(self, step: StepSpec, run: dict[str, Any]) -> None:
        assert self.tx is not None
        scope = self._scope(step)
        params = render(step.params or {}, scope)
        key = f"{self.id}:{step.path}:{run['g']}"
        run["s"] = DISPATCHED
        run["k"] = key
        self.tx.dispatch.append(Workitem(key, self.id, self.spec.name, step.path, step.name,
                                         step.participant or "", params, copy.deepcopy(scope)))
        uses: dict[str, int] = {}
        for delay, name in step.timers:   # by due time: "4h: remind, 8h: remind" are two timers
            uses[name] = uses.get(name, 0) + 1
            self._timer(step.path, "event", self.tx.now + delay,
                        name if uses[name] == 1 else f"{name}#{uses[name]}")
        self._history(step, "dispatched", detail=step.participant or "")

    def _wait_due(self, step: StepSpec) -> float:
        assert self.tx is not None
        if step.until is None:
            return self.tx.now + (step.duration or 0.0)
        text = str(render(step.until, self._scope(step)))
        now = datetime.fromtimestamp(self.tx.now, self.tx.tz)
        try:
            if len(text) <= 5 and ":" in text:
                hh, mm = (int(x) for x in text.split(":"))
                due = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
                if due <= now:
                    due += timedelta(days=1)
            else:
                due = datetime.fromisoformat(text)
                if due.tzinfo is None:
                    due = due.replace(tzinfo=self.tx.tz)
        except ValueError:
            raise TemplateProblem(f"wait until: bad time {text!r}") from None
        if due.timestamp() - self.tx.now > MAX_DURATION:
            raise TemplateProblem(f"wait until: {text!r} is more than {MAX_DURATION_TEXT} away")
        return due.timestamp()

    def _launch_child(self, step: StepSpec, process: str, fields: dict[str, Any],
                      run: dict[str, Any]) -> None:
        assert self.tx is not None
        child_id = self.tx.allocate_id()
        run["c"] = child_id
        self.tx.followups.append(Launch(child_id, process, fields, (self.id, step.path),
                                        f"#{self.id} {step.name}"))
        self._history(step, "subprocess", detail=f"{process} #{child_id}")

    def _finish(self, step: StepSpec) -> None:
        run = self.runs.pop(step.path)
        if "t" in run:
            assert self.tx is not None
            self.tx.timer_ops.append(("del_step", (self.id, step.path), 0.0))
        if step.path == "":
            self._complete()
            return
        parent = self.spec.parents[step.path]
        prun = self.runs.get(parent)
        if prun is not None:
            self._queue.append((parent, prun["g"], step))

    def _child_done(self, parent: StepSpec, prun: dict[str, Any], child: StepSpec) -> None:
        kind = parent.kind
        if kind == "sequence":
            index = int(child.path.rsplit(".", 1)[-1])
            if index + 1 < len(parent.children):
                prun["i"] = index + 1
                self._start(parent.children[index + 1])
            else:
                self._finish(parent)
        elif kind == "if":
            self._finish(parent)
        elif kind == "repeat":
            prun["i"] += 1
            try:
                stop = bool(parent.condition) and bool(evaluate(parent.condition or "", self._scope(parent)))
            except TemplateProblem as exc:
                self._fail(parent, str(exc))
                return
            if stop or prun["i"] >= parent.max:
                self._history(parent, "repeat ended", detail=f"after {prun['i']} iteration(s)"
                              + ("" if stop else " (max reached)"))
                self._finish(parent)
            else:
                self._start(parent.children[0])
        elif kind == "concurrence":
            branch = int(child.path.rsplit(".", 1)[-1])
            prun["done"].append(branch)
            n = len(parent.children)
            needed = n if parent.wait_for == "all" else 1 if parent.wait_for == "any" else int(parent.wait_for)
            if len(prun["done"]) >= needed:
                scope = self._scope(parent)
                order = prun["done"]
                chosen = {"union": order, "first": order[:1], "last": order[-1:], "none": []}[parent.merge]
                # a branch contributes what it changed, so one that left a field
                # alone never overwrites a sibling's new value with the old one
                merged: dict[str, Any] = {}
                for b in chosen:
                    for k, v in prun["bf"][str(b)].items():
                        if k not in scope or scope[k] != v:
                            merged[k] = v
                for other in parent.children:
                    if other.path in self.runs:
                        prefix = other.path + "."
                        for path, run in list(self.runs.items()):
                            if path.startswith(prefix) and run["s"] != ACTIVE_RUN:
                                self._history(self.spec.steps[path], "cancelled",
                                              detail=f"{parent.name} has what it waits for")
                        self._cancel_below(other.path, drop=True)
                scope.update(merged)
                self._finish(parent)

    def _timeout(self, step: StepSpec, run: dict[str, Any]) -> None:
        policy = step.on_timeout
        self._history(step, "timed out", detail=f"after {_human(step.timeout or 0)}")
        if policy.kind == "error":
            self._fail(step, f"timed out after {_human(step.timeout or 0)}")
        elif policy.kind == "skip":
            self._cancel_below(step.path, drop=False)
            self._history(step, "skipped", detail="on timeout")
            self._finish(step)
        else:
            self._cancel_below(step.path, drop=False)
            self._handle(step, policy.subprocess or "", f"timed out after {_human(step.timeout or 0)}")

    def _handle(self, step: StepSpec, process: str, message: str) -> None:
        run = self.runs[step.path]
        run["s"] = HANDLING
        fields = dict(self._scope(step))
        fields["error"] = {"message": message, "step": step.name, "instance": self.id}
        self._launch_child(step, process, fields, run)

    def _fail(self, step: StepSpec, message: str, actor: str = "", *,
              start: StepSpec | None | bool = True, keep_child: bool = False) -> None:
        """``step`` went wrong: the nearest ``on_error`` from ``start`` upwards
        decides; with none, the step is marked failed (retry-able)."""
        assert self.tx is not None
        self._history(step, "error", actor, message)
        at: StepSpec | None = step if start is True else (start or None)  # type: ignore[assignment]
        while at is not None:
            policy = at.on_error
            if policy is not None and policy.kind != "error":
                run = self.runs.get(at.path, {})
                attempt = run.get("a", 0)
                action = policy
                if policy.kind == "retry":
                    if attempt < policy.retries:
                        delay = min(policy.backoff * (2 ** attempt), MAX_DURATION)
                        self._cancel_below(at.path, drop=True)
                        self.serial += 1
                        self.runs[at.path] = {"s": BACKOFF, "g": self.serial, "a": attempt + 1}
                        self._timer(at.path, "retry", self.tx.now + delay)
                        self._history(at, "retry scheduled",
                                      detail=f"attempt {attempt + 2} of {policy.retries + 1} in {_human(delay)}")
                        return
                    action = policy.then or policy
                if action.kind == "skip":
                    self._cancel_below(at.path, drop=False)
                    self._history(at, "skipped", detail="on error")
                    self._finish(at)
                    return
                if action.kind == "subprocess":
                    self._cancel_below(at.path, drop=False)
                    self._handle(at, action.subprocess or "", message)
                    return
            at = self.spec.parent(at.path)
        # nobody handles it: the step stays failed until someone retries it
        failed = self.runs.get(step.path)
        if failed is None:
            return
        run = failed
        if not keep_child:
            self._cancel_below(step.path, drop=False)
        run["s"] = FAILED_RUN
        run["e"] = message[:500]
        self.error = f"{step.name}: {message}"[:500]
        self._history(step, "failed", actor, message)
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, False, {},
                                                   f"failed at {step.name}: {message}"))

    def _cancel_below(self, path: str, *, drop: bool) -> None:
        """Stop the work of the step at ``path`` and of everything under it;
        ``drop`` also forgets the step's own run."""
        assert self.tx is not None
        prefix = path + "." if path else ""
        for p in [p for p in self.runs if p == path or p.startswith(prefix)]:
            run = self.runs[p]
            if "k" in run and run["s"] in (DISPATCHED, PENDING):
                self.tx.cancelled.append(run.pop("k"))
            if "c" in run:
                self.tx.followups.append(CancelInstance(run.pop("c"), f"#{self.id} (step cancelled)"))
            if run.pop("t", None):
                self.tx.timer_ops.append(("del_step", (self.id, p), 0.0))
            if p != path or drop:
                del self.runs[p]
            else:
                run["s"] = ACTIVE_RUN

    def _terminate(self, step: StepSpec, message: str) -> None:
        assert self.tx is not None
        self._history(step, "terminate", detail=message)
        self._cancel_below("", drop=True)
        self.status = Status.TERMINATED
        self._history(None, "terminated", detail=message)
        self._queue.clear()
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, True,
                                                   dict(self.fields), ""))

    def _complete(self) -> None:
        assert self.tx is not None
        self.status = Status.COMPLETED
        self._history(None, "completed")
        self._queue.clear()
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, True,
                                                   dict(self.fields), ""))


def _brief(values: Mapping[str, Any], limit: int = 160) -> str:
    if not values:
        return ""
    text = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return text if len(text) <= limit else text[:limit] + "..."


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
