"""Process instances: the state machine that walks a ``ProcessSpec``.

Pure: no I/O, no clock of its own.  Every entry point runs inside a
``Transition`` and records there what must be written (instance rows,
workitems, timers, history) and what must be done after the commit
(dispatch, cancel, launch or notify other instances).  ``Engine`` commits a
transition, then announces it.

An instance keeps one ``StepRun`` per active step in ``runs`` (path -> run;
see ``engine.runs`` for its fields and stored form).
"""
from __future__ import annotations

import copy
import enum
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Callable, Mapping

from engine.definitions import ProcessSpec, StepSpec
from engine.durations import MAX_DURATION, MAX_DURATION_TEXT, format_duration
from engine.errors import NotAllowedNow
from engine.events import Event
from engine.participants import Reply, Workitem
from engine.runs import RunState, StepRun
from engine.templating import TemplateProblem, evaluate, render
from engine.timerops import ArmTimer, DropStepTimers, DropTimer, MarkFired, TimerKey, TimerOp

if TYPE_CHECKING:
    from engine.store import Op


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

OPEN = (RunState.DISPATCHED, RunState.PENDING)      # a workitem is out: a participant may answer
_WAITING_ON = {RunState.DISPATCHED: "running", RunState.PENDING: "pending", RunState.WAITING: "waiting",
               RunState.BACKOFF: "retry backoff", RunState.HANDLING: "error handler", RunState.FAILED: "failed"}


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
    allocate_id: Callable[[], int]         # for new instances (subprocesses)
    tz: tzinfo = timezone.utc              # for "wait: {until: '02:00'}"
    touched: dict[int, Instance] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    dispatch: list[Workitem] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)     # workitems whose participant must be told
    timer_ops: list[TimerOp] = field(default_factory=list)  # in the order they happened
    deliveries: list[tuple[TimerKey, str]] = field(default_factory=list)  # event timer -> dispatch key
    followups: deque[Launch | ChildFinished | CancelInstance] = field(default_factory=deque)
    extra: list[Op] = field(default_factory=list)
    """Store-level ops written in the same commit as the transition (a
    schedule's bookkeeping with the launch it made; rows of the durable
    outbox): they are durable exactly when the transition is."""


class Instance:
    __slots__ = ("id", "spec", "fields", "status", "runs", "parent", "project", "created",
                 "updated", "serial", "error", "handled", "tx", "_queue")

    def __init__(self, iid: int, spec: ProcessSpec, fields: dict[str, Any], *,
                 status: Status = Status.RUNNING, runs: dict[str, StepRun] | None = None,
                 parent: tuple[int, str] | None = None, project: str | None = None,
                 created: float = 0.0, updated: float = 0.0, serial: int = 0,
                 error: str = "", handled: str = "") -> None:
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
        self.handled = handled      # the last failure an on_error dealt with: "step: message"
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
        if run is None or run.key != key or run.state not in OPEN:
            return False
        self._begin(tx)
        step = self.spec.steps[path]
        tx.closed.append(key)
        run.key = None
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
        if run is None or run.key != key or run.state is not RunState.DISPATCHED:
            return False
        self._begin(tx)
        run.state = RunState.PENDING
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
            if run is not None and step is not None and run.state in OPEN and run.key is not None:
                self._history(step, f"timer {timer.event}")
                tx.timer_ops.append(MarkFired(timer))
                tx.deliveries.append((timer, run.key))
            else:
                tx.timer_ops.append(DropTimer(timer))
            self._end()
            return
        tx.timer_ops.append(DropTimer(timer))   # before anything re-arms the same timer
        if run is not None and step is not None:
            if timer.kind == "timeout" and run.state not in (RunState.FAILED, RunState.BACKOFF,
                                                              RunState.HANDLING):
                self._timeout(step)
            elif timer.kind == "wait" and run.state is RunState.WAITING and step.kind == "wait":
                self._history(step, "wait over")
                self._finish(step)
            elif timer.kind == "retry" and run.state is RunState.BACKOFF:
                self._history(step, "retrying", detail=f"attempt {run.attempt + 1}")
                self._start(step, run.attempt)
        self._end()

    def on_child_finished(self, tx: Transition, note: ChildFinished) -> None:
        run = self.runs.get(note.parent_path)
        if run is None or run.child != note.child_id:
            return  # the step moved on (cancelled, retried): nothing waits for this child
        self._begin(tx)
        step = self.spec.steps[note.parent_path]
        if note.ok:
            run.child = None
            what = "handler" if run.state is RunState.HANDLING else "subprocess"
            fields = note.fields
            if what == "handler":
                # ``error`` described the failure to the handler; the failure is dealt
                # with, so it must not linger to mislead a later condition or handler
                # (the history keeps it)
                fields = {k: v for k, v in fields.items() if k != "error"}
            self._scope(step).update(fields)
            self._history(step, f"{what} done", detail=f"#{note.child_id}")
            self._finish(step)
        elif run.state is not RunState.FAILED:
            message = f"subprocess #{note.child_id} {note.error}"
            if run.state is RunState.HANDLING:
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
        failed = [p for p, r in self.runs.items() if r.state is RunState.FAILED]
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

    def active_steps(self) -> list[tuple[StepSpec, StepRun]]:
        """Leaf runs: what the instance waits on now."""
        return [(self.spec.steps[path], run) for path, run in self.runs.items() if run.state is not RunState.ACTIVE]

    def waiting_on(self) -> str:
        parts = []
        for step, run in self.active_steps():
            parts.append(f"{step.name} {_WAITING_ON[run.state]}" + (f": {run.error}" if run.error else ""))
        return "; ".join(parts)

    # -- internals ---------------------------------------------------------------

    def _begin(self, tx: Transition) -> None:
        self.tx = tx
        tx.touched[self.id] = self

    def _end(self) -> None:
        while self._queue:
            ppath, gen, child = self._queue.popleft()
            prun = self.runs.get(ppath)
            if prun is not None and prun.generation == gen and prun.state is RunState.ACTIVE:
                self._child_done(self.spec.steps[ppath], prun, child)
        if self.error and self.status is not Status.CANCELLED and not any(
                r.state is RunState.FAILED for r in self.runs.values()):
            self.error = ""   # the failure it described is gone (retried, skipped, branch dropped)
        if self.status not in FINISHED:
            states = {r.state for r in self.runs.values()}
            if RunState.FAILED in states:
                self.status = Status.FAILED
            elif RunState.DISPATCHED in states:
                self.status = Status.RUNNING
            else:
                self.status = Status.WAITING
        assert self.tx is not None
        self.updated = self.tx.now
        self.tx = None   # the transition refers to the instance: no cycle left for the GC to find

    def _history(self, step: StepSpec | None, event: str, actor: str = "", detail: str = "") -> None:
        assert self.tx is not None
        self.tx.history.append(Event(self.id, self.spec.name, self.tx.now, step.path if step else "",
                                            step.name if step else "", event, actor, detail))

    def _scope(self, step: StepSpec) -> dict[str, Any]:
        if step.scope is None:
            return self.fields
        cpath, branch = step.scope
        branches = self.runs[cpath].branch_fields
        assert branches is not None   # every run of a concurrence has them
        return branches[branch]

    def _timer(self, path: str, kind: str, due: float, name: str = "") -> None:
        assert self.tx is not None
        self.tx.timer_ops.append(ArmTimer(TimerKey(self.id, path, kind, name), due))
        self.runs[path].has_timers = True

    def _start(self, step: StepSpec, attempt: int = 0) -> None:
        assert self.tx is not None
        self.serial += 1
        run = StepRun(RunState.ACTIVE, self.serial, attempt)
        self.runs[step.path] = run
        if step.timeout is not None:
            self._timer(step.path, "timeout", self.tx.now + step.timeout)
        kind = step.kind
        try:
            if kind == "sequence":
                run.position = 0
                self._start(step.children[0])
            elif kind == "participant":
                self._dispatch(step, run)
            elif kind == "concurrence":
                scope = self._scope(step)
                run.branch_fields = {i: copy.deepcopy(scope) for i in range(len(step.children))}
                run.branches_done = []
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
                run.state = RunState.WAITING
                self._timer(step.path, "wait", self._wait_due(step))
            elif kind == "repeat":
                run.position = 0
                self._start(step.children[0])
            elif kind == "subprocess":
                run.state = RunState.WAITING
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

    def _dispatch(self, step: StepSpec, run: StepRun) -> None:
        assert self.tx is not None
        scope = self._scope(step)
        params = render(step.params or {}, scope)
        key = f"{self.id}:{step.path}:{run.generation}"
        run.state = RunState.DISPATCHED
        run.key = key
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

    def _launch_child(self, step: StepSpec, process: str, fields: dict[str, Any], run: StepRun) -> None:
        assert self.tx is not None
        child_id = self.tx.allocate_id()
        run.child = child_id
        self.tx.followups.append(Launch(child_id, process, fields, (self.id, step.path),
                                        f"#{self.id} {step.name}"))
        self._history(step, "subprocess", detail=f"{process} #{child_id}")

    def _finish(self, step: StepSpec) -> None:
        run = self.runs.pop(step.path)
        if run.has_timers:
            assert self.tx is not None
            self.tx.timer_ops.append(DropStepTimers(self.id, step.path))
        if step.path == "":
            self._complete()
            return
        parent = self.spec.parents[step.path]
        prun = self.runs.get(parent)
        if prun is not None:
            self._queue.append((parent, prun.generation, step))

    def _child_done(self, parent: StepSpec, prun: StepRun, child: StepSpec) -> None:
        kind = parent.kind
        if kind == "sequence":
            index = int(child.path.rsplit(".", 1)[-1])
            if index + 1 < len(parent.children):
                prun.position = index + 1
                self._start(parent.children[index + 1])
            else:
                self._finish(parent)
        elif kind == "if":
            self._finish(parent)
        elif kind == "repeat":
            iterations = prun.position = (prun.position or 0) + 1
            try:
                stop = bool(parent.condition) and bool(evaluate(parent.condition or "", self._scope(parent)))
            except TemplateProblem as exc:
                self._fail(parent, str(exc))
                return
            if stop or iterations >= parent.max:
                self._history(parent, "repeat ended", detail=f"after {iterations} iteration(s)"
                              + ("" if stop else " (max reached)"))
                self._finish(parent)
            else:
                self._start(parent.children[0])
        elif kind == "concurrence":
            branch = int(child.path.rsplit(".", 1)[-1])
            order = prun.branches_done
            branches = prun.branch_fields
            assert order is not None and branches is not None   # set when the concurrence started
            order.append(branch)
            n = len(parent.children)
            needed = n if parent.wait_for == "all" else 1 if parent.wait_for == "any" else int(parent.wait_for)
            if len(order) >= needed:
                scope = self._scope(parent)
                chosen = {"union": order, "first": order[:1], "last": order[-1:], "none": []}[parent.merge]
                # a branch contributes what it changed, so one that left a field
                # alone never overwrites a sibling's new value with the old one
                merged: dict[str, Any] = {}
                for b in chosen:
                    for k, v in branches[b].items():
                        if k not in scope or scope[k] != v:
                            merged[k] = v
                for other in parent.children:
                    if other.path in self.runs:
                        prefix = other.path + "."
                        for path, run in list(self.runs.items()):
                            if path.startswith(prefix) and run.state is not RunState.ACTIVE:
                                self._history(self.spec.steps[path], "cancelled",
                                              detail=f"{parent.name} has what it waits for")
                        self._cancel_below(other.path, drop=True)
                scope.update(merged)
                self._finish(parent)

    def _timeout(self, step: StepSpec) -> None:
        policy = step.on_timeout
        after = format_duration(step.timeout or 0)
        self._history(step, "timed out", detail=f"after {after}")
        if policy.kind == "error":
            self._fail(step, f"timed out after {after}")
        elif policy.kind == "skip":
            self._cancel_below(step.path, drop=False)
            self._history(step, "skipped", detail="on timeout")
            self._finish(step)
        else:
            self._cancel_below(step.path, drop=False)
            self._handle(step, policy.subprocess or "", f"timed out after {after}")

    def _handle(self, step: StepSpec, process: str, message: str) -> None:
        run = self.runs[step.path]
        run.state = RunState.HANDLING
        fields = dict(self._scope(step))
        fields["error"] = {"message": message, "step": step.name, "instance": self.id}
        self._launch_child(step, process, fields, run)

    def _fail(self, step: StepSpec, message: str, actor: str = "", *,
              start: StepSpec | None | bool = True, keep_child: bool = False) -> None:
        """``step`` went wrong: the nearest ``on_error`` from ``start`` upwards
        decides; with none, the step is marked failed (retry-able)."""
        assert self.tx is not None
        self._history(step, "error", actor, message)
        at: StepSpec | None = step if start is True else (start or None)
        while at is not None:
            policy = at.on_error
            if policy is not None and policy.kind != "error":
                current = self.runs.get(at.path)
                attempt = current.attempt if current is not None else 0
                action = policy
                if policy.kind == "retry":
                    if attempt < policy.retries:
                        delay = min(policy.backoff * (2 ** attempt), MAX_DURATION)
                        self._cancel_below(at.path, drop=True)
                        self.serial += 1
                        self.runs[at.path] = StepRun(RunState.BACKOFF, self.serial, attempt + 1)
                        self._timer(at.path, "retry", self.tx.now + delay)
                        self._history(at, "retry scheduled", detail=f"attempt {attempt + 2} of "
                                      f"{policy.retries + 1} in {format_duration(delay)}")
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
        run = self.runs.get(step.path)
        if run is None:
            return
        if not keep_child:
            self._cancel_below(step.path, drop=False)
        run.state = RunState.FAILED
        run.error = message[:500]
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
            if run.key is not None and run.state in OPEN:
                self.tx.cancelled.append(run.key)
                run.key = None
            if run.child is not None:
                self.tx.followups.append(CancelInstance(run.child, f"#{self.id} (step cancelled)"))
                run.child = None
            if run.has_timers:
                run.has_timers = False
                self.tx.timer_ops.append(DropStepTimers(self.id, p))
            if p != path or drop:
                del self.runs[p]
            else:
                run.state = RunState.ACTIVE

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
