"""Process instances: the state machine that walks a ``ProcessSpec``.

Pure: no I/O, no clock of its own.  Every entry point runs inside a
``Transition`` and records there what must be written (instance rows,
workitems, timers, history) and what must be done after the commit
(dispatch, cancel, launch or notify other instances).  ``Engine`` commits a
transition, then announces it.

An instance keeps one ``StepRun`` per active step in ``runs`` (path -> run;
see ``engine.runs`` for its fields and stored form).

Error handlers.  A failure that an ``on_error: {subprocess: NAME}`` takes
over runs the handler as a child of the step that owns the policy (the
"handling" step; the failed step itself, or an enclosing one, up to the
process).  When the handling step encloses the failed one, the work under it
is *suspended*, not forgotten: open workitems, subprocesses and timers are
cancelled, but the runs stay (``SUSPENDED`` for the steps that were under way,
the failed one included), so that a ``retry`` after a failed handler resumes
exactly there, never re-running a step that was done; ``retry ... handler``
runs the handler again.  A handler that completes ends the handling step: the
suspended work is dropped, and the instance's ``handled`` says what failure
was dealt with (its outcome: recovered).

Cancellation.  A step (or the process) with ``on_cancel: {subprocess: NAME}``
that is cut off while under way (the instance cancelled, a concurrence or
for_each that no longer waits for its branch, an enclosing timeout, a
terminate elsewhere, suspended work dropped after its handler) starts that
subprocess in the same transition, with the fields plus ``cancel: {actor,
step, reason}``; nobody waits for it.
"""
from __future__ import annotations

import copy
import enum
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Callable, Mapping

from engine.definitions import MAX_ITEMS, ProcessSpec, StepSpec
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
               RunState.BACKOFF: "retry backoff", RunState.HANDLING: "error handler", RunState.FAILED: "failed",
               RunState.SUSPENDED: "suspended"}


@dataclass(frozen=True)
class _Cut:
    """Why steps are being cut off: what their on_cancel handlers are told."""
    actor: str
    reason: str


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
        step = self.spec.step(path)
        tx.closed.append(key)
        tx.extra.extend(reply.ops)      # the participant's own writes, in the commit of its answer
        run.key = None
        for kind, detail in reply.events:     # the participant's own events (their detail says who)
            self._history(step, kind, "", detail)
        if reply.kind == "done":
            self._scope(step).update(reply.fields)
            self._history(step, "done", actor, _brief(reply.fields))
            self._finish(step)
        else:
            self._fail(step, reply.error or "failed", actor)
        self._end()
        return True

    def on_note(self, tx: Transition, path: str, key: str, reply: Reply) -> bool:
        """A participant still waiting wrote something (a reminder sent): its
        ops and events, if the step is still open."""
        run = self.runs.get(path)
        if run is None or run.key != key or run.state not in OPEN:
            return False
        self._begin(tx)
        tx.extra.extend(reply.ops)
        for kind, detail in reply.events:
            self._history(self.spec.step(path), kind, "", detail)
        self._end()
        return True

    def on_pending(self, tx: Transition, path: str, key: str, reply: Reply | None = None) -> bool:
        run = self.runs.get(path)
        if run is None or run.key != key or run.state is not RunState.DISPATCHED:
            return False
        self._begin(tx)
        run.state = RunState.PENDING
        tx.pending.append(key)
        step = self.spec.step(path)
        if reply is not None:
            tx.extra.extend(reply.ops)
            for kind, detail in reply.events:
                self._history(step, kind, "", detail)
        self._history(step, "pending")
        self._end()
        return True

    def on_timer(self, tx: Transition, timer: TimerKey) -> None:
        """A timer of this instance is due.  An event timer for a live step is
        queued in ``tx.deliveries`` for its participant."""
        self._begin(tx)
        run = self.runs.get(timer.path)
        step = self.spec.find(timer.path)
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
        step = self.spec.step(note.parent_path)
        if note.ok:
            run.child = None
            what = "handler" if run.state is RunState.HANDLING else "subprocess"
            fields = note.fields
            if what == "handler":
                # ``error`` described the failure to the handler; the failure is dealt
                # with, so it must not linger to mislead a later condition or handler
                # (the history keeps it)
                fields = {k: v for k, v in fields.items() if k != "error"}
                info = run.handling
                if info is not None:
                    if info.get("kind") == "error":
                        self.handled = f"{info['step']}: {info['message']}"[:500]
                    if info["path"] != step.path:
                        # the work suspended under the handling step is given up for good
                        self._cancel_below(step.path, drop=False, cut=_Cut("", f"error at {info['step']} handled"),
                                           spare=_chain(info["path"]))
            self._scope(step).update(fields)
            self._history(step, f"{what} done", detail=f"#{note.child_id}")
            self._finish(step)
        elif run.state is not RunState.FAILED:
            message = f"subprocess #{note.child_id} {note.error}"
            info = run.handling
            if run.state is RunState.HANDLING and info is not None:
                message = (f"handler {info['process']} #{note.child_id} {note.error} "
                           f"(handling {info['step']}: {info['message']})")
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
        self._history(None, "cancelled", actor)
        self._cancel_below("", drop=True, cut=_Cut(actor, "instance cancelled"))
        self.status = Status.CANCELLED
        if self.parent:
            tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, False, {}, "was cancelled"))
        self._end()

    def retry(self, tx: Transition, actor: str, fields: Mapping[str, Any] | None = None,
              handler: bool = False) -> list[str]:
        """Start the failed steps again.  ``fields`` are the fix, when the fix is
        data (a missing or wrong field): set where each failed step reads them.
        A step whose error handler failed resumes where its work stopped (the
        step that failed first, and what was under way beside it); with
        ``handler``, only the failed handlers run again."""
        failed = [p for p, r in self.runs.items() if r.state is RunState.FAILED]
        if handler:
            failed = [p for p in failed if self.runs[p].handling is not None]
            if not failed:
                raise NotAllowedNow(f"#{self.id} has no failed error handler to retry (it is {self.status.value})")
        if not failed:
            raise NotAllowedNow(f"#{self.id} has no failed step to retry (it is {self.status.value})")
        self._begin(tx)
        names = []
        for path in failed:
            run = self.runs.get(path)
            if run is None or run.state is not RunState.FAILED:
                continue       # gone with an earlier one (a failed branch of a retried step)
            step = self.spec.step(path)
            info = run.handling
            detail = _brief(dict(fields)) if fields else ""
            if handler and info is not None:
                if fields:
                    self._scope(step).update(fields)
                self._history(step, "handler retried", actor, detail)
                names.append(info["process"])
                self._stop_child(run)
                self._handle(step, info["process"], info["message"], info["step"], info["path"], info["kind"])
            elif info is not None and info["path"] != path:
                failed_step = self.spec.step(info["path"])
                if fields:
                    self._scope(failed_step).update(fields)
                self._history(failed_step, "retried", actor, detail)
                names.append(failed_step.name)
                self._resume(step, run)
            else:
                self._cancel_below(path, drop=False)
                if fields:
                    self._scope(step).update(fields)
                self._history(step, "retried", actor, detail)
                names.append(step.name)
                self._start(step)   # after a fix, on_error's automatic retries start afresh
        self.error = ""
        self._end()
        return names

    # -- views -----------------------------------------------------------------

    def active_steps(self) -> list[tuple[StepSpec, StepRun]]:
        """Leaf runs: what the instance waits on now."""
        return [(self.spec.step(path), run) for path, run in self.runs.items() if run.state is not RunState.ACTIVE]

    def waiting_on(self) -> str:
        parts = []
        for step, run in self.active_steps():
            if run.state is RunState.SUSPENDED:
                continue        # ``show`` lists them; here the handler is what it waits on
            parts.append(f"{_label(step)} {_WAITING_ON[run.state]}" + (f": {run.error}" if run.error else ""))
        return "; ".join(parts)

    # -- internals ---------------------------------------------------------------

    def _begin(self, tx: Transition) -> None:
        self.tx = tx
        tx.touched[self.id] = self

    def _end(self) -> None:
        while self._queue:
            ppath, gen, child = self._queue.popleft()
            prun = self.runs.get(ppath)
            if prun is not None and prun.generation == gen and (
                    prun.state is RunState.ACTIVE or _holds(prun, ppath)):
                self._child_done(self.spec.step(ppath), prun, child)
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
                                            step.name if step and step.path else "", event, actor, detail,
                                            self.project))

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
        if self._held(step.path):
            # an enclosing step's error handler runs: this waits for a retry to resume it
            run.state = RunState.SUSPENDED
            return
        if step.guard is not None:
            try:
                go = bool(evaluate(step.guard, self._scope(step)))
            except TemplateProblem as exc:
                self._fail(step, str(exc))
                return
            if not go:
                self._history(step, "skipped", detail=f"if: {step.guard}")
                self._finish(step)
                return
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
                decided = f"if: {step.condition}"
                if evaluate(step.condition or "false", self._scope(step)):
                    self._history(step, "then taken", detail=decided)
                    self._start(step.children[0])
                elif len(step.children) > 1:
                    self._history(step, "else taken", detail=decided)
                    self._start(step.children[1])
                else:
                    self._history(step, "skipped", detail=decided)
                    self._finish(step)
            elif kind == "wait":
                run.state = RunState.WAITING
                self._timer(step.path, "wait", self._wait_due(step))
            elif kind == "repeat":
                run.position = 0
                self._start(step.children[0])
            elif kind == "for_each":
                items = render(step.params, self._scope(step))
                if isinstance(items, tuple):
                    items = list(items)
                if not isinstance(items, list):
                    raise TemplateProblem(f"for_each: expected a list, got {_brief({'items': items})[6:]}")
                if len(items) > MAX_ITEMS:
                    raise TemplateProblem(f"for_each: {len(items)} items, more than {MAX_ITEMS}")
                run.items, run.position = items, 0
                run.branch_fields, run.branches_done, run.results = {}, [], {}
                self._history(step, "for_each started", detail=f"{len(items)} item(s) as {step.var}"
                              + (": " + _brief_items(items) if items else ""))
                if items:
                    self._next_bodies(step, run)
                else:
                    self._end_for_each(step, run)
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

    def _launch_child(self, step: StepSpec, process: str, fields: dict[str, Any], run: StepRun,
                      event: str = "subprocess") -> None:
        assert self.tx is not None
        child_id = self.tx.allocate_id()
        run.child = child_id
        self.tx.followups.append(Launch(child_id, process, fields, (self.id, step.path),
                                        f"#{self.id} {step.name}"))
        self._history(step, event, detail=f"{process} #{child_id}")

    def _on_cancel(self, step: StepSpec, cut: _Cut) -> None:
        """Start ``step``'s on_cancel handler (nobody waits for it)."""
        assert self.tx is not None and step.on_cancel is not None
        if step.path:
            where = step.name
        else:     # the process's own: what it was doing
            where = ", ".join(self.spec.step(p).name for p, r in self.runs.items()
                              if r.state is not RunState.ACTIVE) or "process"
        fields = dict(self._scope(step))
        fields["cancel"] = {"actor": cut.actor, "step": where, "reason": cut.reason, "instance": self.id}
        child_id = self.tx.allocate_id()
        self.tx.followups.append(Launch(child_id, step.on_cancel, fields, (self.id, step.path),
                                        f"#{self.id} {step.name if step.path else 'process'} cancelled"))
        self._history(step if step.path else None, "cancel handler", detail=f"{step.on_cancel} #{child_id}")

    def _held(self, path: str) -> bool:
        """Is an enclosing step's error handler running (or failed) for work under it?"""
        at = path
        while at:
            at = at.rpartition(".")[0]
            run = self.runs.get(at)
            if run is not None and run.handling is not None and _holds(run, at):
                return True
        return False

    def _suspend(self, at: StepSpec, failed: StepSpec) -> None:
        """Stop the work under ``at`` while its handler runs, keeping where it
        stood: composite runs stay, what was under way (the failed step
        included) becomes SUSPENDED, and what ran under the failed step goes."""
        assert self.tx is not None
        self._cancel_below(failed.path, drop=False)
        prefix = at.path + "." if at.path else ""
        for p, run in self.runs.items():
            if p != at.path and not p.startswith(prefix):
                continue
            if run.key is not None and run.state in OPEN:
                self.tx.cancelled.append(run.key)
                run.key = None
            self._stop_child(run)
            if run.has_timers:
                run.has_timers = False
                self.tx.timer_ops.append(DropStepTimers(self.id, p))
            if p == failed.path or (p != at.path and run.state is not RunState.ACTIVE):
                run.state = RunState.SUSPENDED
                run.error = ""
                run.attempt = 0
        self._history(at, "suspended", detail=f"until the error at {failed.name} is handled")

    def _resume(self, at: StepSpec, run: StepRun) -> None:
        """``retry`` of a handling step whose handler failed: start again what
        was suspended under it, where it stood (the failed step first)."""
        assert self.tx is not None and run.handling is not None
        failed_path = run.handling["path"]
        run.handling = None
        run.state = RunState.ACTIVE
        run.error = ""
        self._stop_child(run)
        prefix = at.path + "." if at.path else ""
        for p, r in list(self.runs.items()):
            if (p == at.path or p.startswith(prefix)) and r.state is RunState.ACTIVE:
                timeout = self.spec.step(p).timeout
                if timeout is not None:
                    self._timer(p, "timeout", self.tx.now + timeout)     # a fresh deadline
        todo = [p for p, r in self.runs.items() if p.startswith(prefix) and r.state is RunState.SUSPENDED]
        if failed_path not in self.runs:
            todo.insert(0, failed_path)
        for p in sorted(todo, key=lambda p: (p != failed_path, p)):
            current = self.runs.get(p)
            if current is not None and current.state is not RunState.SUSPENDED:
                continue
            parent = self.spec.parent_path(p)
            if parent is not None and parent not in self.runs:
                continue       # what enclosed it ended meanwhile
            self._start(self.spec.step(p))

    def _stop_child(self, run: StepRun) -> None:
        if run.child is not None:
            assert self.tx is not None
            self.tx.followups.append(CancelInstance(run.child, f"#{self.id} (step cancelled)"))
            run.child = None

    def _finish(self, step: StepSpec) -> None:
        run = self.runs.pop(step.path)
        if run.has_timers:
            assert self.tx is not None
            self.tx.timer_ops.append(DropStepTimers(self.id, step.path))
        if step.path == "":
            self._complete()
            return
        parent = self.spec.parent_path(step.path)
        assert parent is not None
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
            if not stop and iterations >= parent.max and parent.condition and parent.on_exhausted == "error":
                self._fail(parent, f"repeat: max {parent.max} iteration(s) reached and break_if "
                                   f"{parent.condition!r} still false")
            elif stop or iterations >= parent.max:
                self._history(parent, "repeat ended", detail=f"after {iterations} iteration(s)"
                              + ("" if stop else " (max reached)"))
                self._finish(parent)
            else:
                self._start(parent.children[0])
        elif kind == "for_each":
            self._body_done(parent, prun, int(child.path.rsplit(".", 1)[-1]))
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
                        self._drop_branch(parent, other.path)
                scope.update(merged)
                self._finish(parent)

    def _drop_branch(self, parent: StepSpec, path: str) -> None:
        """A branch (or for_each body) its concurrence no longer waits for."""
        why = f"{parent.name} has what it waits for"
        prefix = path + "."
        for p, run in list(self.runs.items()):
            if (p == path or p.startswith(prefix)) and run.state is not RunState.ACTIVE:
                self._history(self.spec.step(p), "cancelled", detail=why)
        self._cancel_below(path, drop=True, cut=_Cut("", why))

    def _next_bodies(self, step: StepSpec, run: StepRun) -> None:
        """Start for_each bodies while the limit allows: one at a time, or for a
        concurrent one up to max_parallel (all) at once.  Each body runs on its
        own copy of the fields, with ``as`` set to its item."""
        items, bodies = run.items, run.branch_fields
        assert items is not None and bodies is not None and run.position is not None
        limit = (step.max_parallel or len(items)) if step.concurrent else 1
        while run.position < len(items) and len(bodies) < limit:
            index = run.position
            run.position += 1
            fields = copy.deepcopy(self._scope(step))
            item = items[index]
            fields[step.var or "item"] = item if isinstance(item, (str, int, float, bool)) else copy.deepcopy(item)
            bodies[index] = fields
            self._start(self.spec.step(f"{step.path}.{index}"))
            if self.runs.get(step.path) is not run:
                return         # ended meanwhile (a failure handled above it)

    def _body_done(self, step: StepSpec, run: StepRun, index: int) -> None:
        items, bodies, done, results = run.items, run.branch_fields, run.branches_done, run.results
        assert items is not None and bodies is not None and done is not None and results is not None
        scope = self._scope(step)
        body = bodies.pop(index)
        changed = {k: v for k, v in body.items() if k != step.var and (k not in scope or scope[k] != v)}
        results[index] = changed
        done.append(index)
        total = len(items)
        if not step.concurrent:
            if step.merge in ("union", "last") or (step.merge == "first" and index == 0):
                scope.update(changed)
            if len(done) < total:
                self._next_bodies(step, run)
            else:
                self._end_for_each(step, run)
            return
        wanted = step.wait_for
        needed = total if wanted == "all" else 1 if wanted == "any" else min(int(wanted), total)
        if len(done) < needed:
            self._next_bodies(step, run)
            return
        for other in sorted(bodies):
            self._drop_branch(step, f"{step.path}.{other}")
        bodies.clear()
        chosen = {"union": done, "first": done[:1], "last": done[-1:], "none": []}[step.merge]
        merged: dict[str, Any] = {}
        for b in chosen:
            merged.update(results[b])
        scope.update(merged)
        self._end_for_each(step, run)

    def _end_for_each(self, step: StepSpec, run: StepRun) -> None:
        items, results, done = run.items, run.results, run.branches_done
        assert items is not None and results is not None and done is not None
        if step.collect:
            self._scope(step)[step.collect] = [results.get(i) for i in range(len(items))]
        self._history(step, "for_each ended", detail=f"{len(done)} of {len(items)} item(s) done")
        self._finish(step)

    def _timeout(self, step: StepSpec) -> None:
        policy = step.on_timeout
        after = format_duration(step.timeout or 0)
        self._history(step, "timed out", detail=f"after {after}")
        if policy.kind == "error":
            self._fail(step, f"timed out after {after}")
        elif policy.kind == "skip":
            self._cancel_below(step.path, drop=False, cut=_Cut("", f"{step.name} timed out"), spare={step.path})
            self._history(step, "skipped", detail="on timeout")
            self._finish(step)
        else:
            self._cancel_below(step.path, drop=False, cut=_Cut("", f"{step.name} timed out"), spare={step.path})
            self._handle(step, policy.subprocess or "", f"timed out after {after}", step.name, step.path, "timeout")

    def _handle(self, step: StepSpec, process: str, message: str, failed: str, failed_path: str,
                kind: str) -> None:
        """Run ``process`` as the error (or timeout) handler of ``step``: the
        failure was ``message`` at the step ``failed`` (its path ``failed_path``)."""
        run = self.runs[step.path]
        run.state = RunState.HANDLING
        run.handling = {"process": process, "message": message, "step": failed, "path": failed_path, "kind": kind}
        fields = dict(self._scope(step))
        if self.spec.language == 1:
            # language 1 told the handler the step whose policy handled it (sequence@root for the process's)
            fields["error"] = {"message": message, "step": step.name, "instance": self.id}
        else:
            fields["error"] = {"message": message, "step": failed, "path": failed_path, "instance": self.id}
        self._launch_child(step, process, fields, run, event="handler")

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
                    self._cancel_below(at.path, drop=False, cut=_Cut("", f"{at.name} skipped on error"),
                                       spare=_chain(step.path))
                    self._history(at, "skipped", detail="on error")
                    self.handled = f"{step.name}: {message}"[:500]
                    self._finish(at)
                    return
                if action.kind == "subprocess":
                    if at.path == step.path:
                        self._cancel_below(at.path, drop=False)
                    else:
                        self._suspend(at, step)
                    self._handle(at, action.subprocess or "", message, step.name, step.path, "error")
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
        self.error = f"{_label(step)}: {message}"[:500]
        self._history(step, "failed", actor, message)
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, False, {},
                                                   f"failed at {_label(step)}: {message}"))

    def _cancel_below(self, path: str, *, drop: bool, cut: _Cut | None = None,
                      spare: set[str] | frozenset[str] = frozenset()) -> None:
        """Stop the work of the step at ``path`` and of everything under it;
        ``drop`` also forgets the step's own run.  With ``cut``, the steps cut
        off (but those in ``spare``) that have an on_cancel get it run."""
        assert self.tx is not None
        prefix = path + "." if path else ""
        below = [p for p in self.runs if p == path or p.startswith(prefix)]
        if cut is not None:
            for p in below:
                step = self.spec.step(p)
                if step.on_cancel and p not in spare and (drop or p != path):
                    self._on_cancel(step, cut)
        for p in below:
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
        self._cancel_below("", drop=True, cut=_Cut("", f"terminated at {step.name}"), spare=_chain(step.path))
        self.status = Status.TERMINATED
        self._history(None, "terminated", detail=message)
        self._queue.clear()
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, True,
                                                   dict(self.fields), ""))

    def _complete(self) -> None:
        assert self.tx is not None
        self.status = Status.COMPLETED
        self._history(None, "completed", detail=f"recovered from {self.handled}"[:500] if self.handled else "")
        self._queue.clear()
        if self.parent:
            self.tx.followups.append(ChildFinished(self.parent[0], self.parent[1], self.id, True,
                                                   dict(self.fields), ""))


def _label(step: StepSpec) -> str:
    """A step as people read it; the process's own (root) sequence is "process"."""
    return step.name if step.path else "process"


def _holds(run: StepRun, path: str) -> bool:
    """Does ``run`` (at ``path``) hold suspended work under it for its handler?"""
    return run.handling is not None and run.handling["path"] != path and run.state in (
        RunState.HANDLING, RunState.FAILED)


def _chain(path: str) -> set[str]:
    """``path`` and every step enclosing it, up to the process."""
    out = {path}
    while path:
        path = path.rpartition(".")[0]
        out.add(path)
    return out


def _brief_items(items: list[Any], limit: int = 160) -> str:
    text = ", ".join(repr(i) for i in items)
    return text if len(text) <= limit else text[:limit] + "..."


def _brief(values: Mapping[str, Any], limit: int = 160) -> str:
    if not values:
        return ""
    text = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return text if len(text) <= limit else text[:limit] + "..."
