"""The engine: launch, dispatch, reply, cancel, retry -- write, then announce.

Every change runs as a ``Transition`` over one or more instances (a
subprocess launch or completion touches two), is committed to SQLite by the
store's group-commit writer, and only then announced: events published,
workitems handed to participants, timers armed.  Nothing a participant or a
person sees can be lost by a crash after it was seen.

Recovery at start (``Engine.start``): workitems that were dispatched but not
answered are dispatched again with the same key; pending ones stay pending;
cancellations and fired reminders not yet delivered are delivered; timers are
re-armed from SQLite, and overdue ones fire once.  Instances are loaded
lazily, when something happens to them, so start-up does not grow with the
number of waiting instances.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from zoneinfo import ZoneInfo
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

from engine.definitions import ProcessSpec, parse_definition
from engine.errors import EngineError, NoSuchInstance, NoSuchWorkitem, NotAllowedNow, UnknownProcess
from engine.events import Event, EventBus
from engine.instances import (ACTIVE, CancelInstance, ChildFinished, Instance, Launch, Status, TimerKey,
                              Transition, event_name)
from engine.participants import ParticipantRegistry, Reply, Workitem
from engine.yamlconfig import loads_yaml
from engine.schedules import ScheduleSpec
from engine.store import InstanceRow, Op, Store, TimerRow, WorkitemRow, dumps
from engine.timers import Clock, SystemClock, TimerService, next_cron

log = logging.getLogger(__name__)

_ACTIVE_NAMES = frozenset(s.value for s in ACTIVE)
# A subprocess starts in the same transition as the step that calls it, so a
# cycle of definitions (a calls b calls a) would build instances without end
# and never yield.  Validation reports cycles; this bounds what slips past it
# (an instance running an earlier version of a definition, say).
MAX_SUBPROCESS_DEPTH = 32
Action = Callable[[Instance | None, Transition], Any]


@dataclass(frozen=True)
class InstanceSummary:
    id: int
    process: str
    status: str
    project: str | None
    created: float
    updated: float
    waiting_on: str
    parent_id: int | None
    error: str


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    cron: str
    process: str
    misfire: str
    next_due: float | None
    last_run: float | None


@dataclass(frozen=True)
class InstanceDetail:
    summary: InstanceSummary
    fields: Mapping[str, Any]
    steps: list[str]
    timers: list[tuple[str, str, float, bool]]     # what, step name, due, fired
    children: list[int]


class Engine:
    def __init__(self, store: Store, specs: Mapping[str, ProcessSpec], participants: ParticipantRegistry,
                 *, clock: Clock | None = None, bus: EventBus | None = None,
                 schedules: Iterable[ScheduleSpec] = (), use_scheduler: bool = True,
                 timezone: str = "UTC") -> None:
        self.store = store
        self.specs = dict(specs)
        self.participants = participants
        self.clock = clock or SystemClock()
        self.bus = bus or EventBus()
        self.schedule_specs = {s.name: s for s in schedules}
        self.timers = TimerService(store, self._fire_timers, self.clock, use_scheduler)
        self._instances: dict[int, Instance] = {}
        self._loading: dict[int, asyncio.Future[Instance | None]] = {}
        self._next_id = 1
        self.tz = ZoneInfo(timezone)
        self._old_specs: dict[str, ProcessSpec] = {}     # earlier versions still running somewhere
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = False

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._next_id = await self.store.max_instance_id() + 1
        now = self.clock.now()
        await self.store.commit([self.store.definition_op(
            [(s.digest, s.name, s.source, now) for s in self.specs.values() if s.digest])])
        for participant in self.participants.all():
            await participant.setup(self)
        await self._sync_schedules()
        redo = await self.store.workitems(state="dispatched")
        for row in redo:
            self._spawn(self._consume(_workitem(row)))
        cancelling = await self.store.workitems(state="cancelling")
        if cancelling:
            self._spawn(self._tell_cancelled([r.key for r in cancelling]))
        for timer in await self.store.fired_timers():
            self._spawn(self._deliver_timer(TimerKey(timer.instance_id, timer.path, timer.kind, timer.name), None))
        await self.timers.start()
        self.started = True
        if redo or cancelling:
            log.info("recovered: %d workitem(s) dispatched again, %d cancellation(s) delivered",
                     len(redo), len(cancelling))

    async def stop(self) -> None:
        await self.timers.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for participant in self.participants.all():
            try:
                await participant.shutdown()
            except Exception:
                log.exception("participant %s failed to shut down", participant.name)
        await self.bus.close()

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until no participant call or delivery is in flight (tests, benchmarks)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._tasks:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{len(self._tasks)} task(s) still running")
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        await self.bus.drain()

    # -- the public operations ---------------------------------------------------

    async def launch(self, process: str, fields: Mapping[str, Any] | None = None, *, actor: str = "") -> int:
        spec = self.specs.get(process)
        if spec is None:
            raise UnknownProcess(f"unknown process {process!r}")
        inst = self._new_instance(self._allocate(), spec, dict(fields or {}), None)
        await self._transact([(inst.id, lambda i, tx: i.start(tx, actor))])  # type: ignore[union-attr]
        log.info("#%d %s launched by %s", inst.id, process, actor or "engine")
        return inst.id

    async def reply(self, key: str, reply: Reply, *, actor: str = "") -> None:
        """Answer a dispatched or pending workitem (participants, approvals)."""
        if reply.kind not in ("done", "failed"):
            raise NotAllowedNow(f"a reply to {key} must be done or failed, not {reply.kind}")
        iid, path = _parse_key(key)
        inst = await self._get(iid)
        if inst is None:
            raise NoSuchWorkitem(f"no open step {key}")
        accepted = await self._transact([(iid, lambda i, tx: i.on_reply(tx, path, key, reply, actor)  # type: ignore[union-attr]
                                          if i else False)])
        if not accepted[0]:
            raise NoSuchWorkitem(f"step {key} is not open any more (answered, cancelled or unknown)")

    async def cancel(self, instance_id: int, *, actor: str = "") -> None:
        await self._require(instance_id)
        await self._transact([(instance_id, lambda i, tx: i.cancel(tx, actor))])  # type: ignore[union-attr]
        log.info("#%d cancelled by %s", instance_id, actor or "engine")

    async def retry(self, instance_id: int, *, actor: str = "",
                    fields: Mapping[str, Any] | None = None) -> list[str]:
        """Start an instance's failed steps again, after setting ``fields`` (the fix, if it is data)."""
        await self._require(instance_id)
        names = await self._transact([(instance_id,
                                        lambda i, tx: i.retry(tx, actor, fields))])  # type: ignore[union-attr]
        log.info("#%d retried by %s: %s", instance_id, actor or "engine", ", ".join(names[0]))
        return names[0]  # type: ignore[no-any-return]

    async def pending(self, participant: str | None = None) -> list[Workitem]:
        """Workitems a participant holds (for approvals: what is waiting for answers)."""
        rows = await self.store.workitems(state="pending")
        return [_workitem(r) for r in rows if participant is None or r.participant == participant]

    # -- views -------------------------------------------------------------------

    async def instances(self, include_finished: bool = False, limit: int = 200,
                        projects: Sequence[str] | None = None) -> list[InstanceSummary]:
        """Newest first; ``projects`` limits the list to instances without a
        project or in those projects and their sub-projects (None: all)."""
        rows = await self.store.list_instances(include_finished, limit, projects)
        for row in rows:
            if row.status in _ACTIVE_NAMES and self._known_spec(row) is None:
                try:
                    await self._spec_of(row)
                except EngineError:
                    pass
        return [self._summary(r) for r in rows]

    async def instance_count(self, include_finished: bool = False, projects: Sequence[str] | None = None) -> int:
        """How many instances ``instances`` would list without its limit."""
        return await self.store.count_instances(include_finished, projects)  # type: ignore[no-any-return]

    async def summary(self, instance_id: int) -> InstanceSummary:
        rows = await self.store.load_instances([instance_id])
        if not rows:
            raise NoSuchInstance(f"no instance #{instance_id}")
        return self._summary(rows[0])

    async def describe(self, instance_id: int) -> InstanceDetail:
        rows = await self.store.load_instances([instance_id])
        if not rows:
            raise NoSuchInstance(f"no instance #{instance_id}")
        row = rows[0]
        steps = []
        try:
            spec: ProcessSpec | None = await self._spec_of(row)
        except EngineError:
            spec = None
        for path, run in sorted(row.runs.items()):
            if run["s"] == "active":
                continue
            step = spec.steps.get(path) if spec else None
            name = step.name if step else path
            what = f" ({step.participant})" if step and step.participant else ""
            extra = f" [key {run['k']}]" if "k" in run else ""
            extra += f" [subprocess #{run['c']}]" if "c" in run else ""
            extra += f": {run['e']}" if run.get("e") else ""
            steps.append(f"{name}{what}: {run['s']}{extra}")
        timers = []
        for t in await self.store.timers_of(instance_id):
            step = spec.steps.get(t.path) if spec else None
            timers.append((event_name(t.name) if t.kind == "event" else t.kind,
                           step.name if step else (t.path or "process"), t.due, bool(t.fired)))
        children = [int(r["c"]) for r in row.runs.values() if "c" in r]
        return InstanceDetail(self._summary(row), row.fields, steps, timers, children)

    async def history(self, instance_id: int) -> list[Event]:
        summary = await self.summary(instance_id)
        rows = await self.store.history(instance_id)
        return [Event(r.instance_id, summary.process, r.at, r.path, r.step, r.event, r.actor, r.detail)
                for r in rows]

    async def schedules(self) -> list[ScheduleInfo]:
        stored = await self.store.schedules()
        due = await self.store.schedule_timers()
        return [ScheduleInfo(s.name, s.cron, s.process, s.misfire, due.get(s.name),
                             stored.get(s.name, ("", None))[1]) for s in self.schedule_specs.values()]

    def _summary(self, row: InstanceRow) -> InstanceSummary:
        waiting = ""
        spec = self._known_spec(row)
        if spec is not None and row.status in _ACTIVE_NAMES:
            waiting = self._from_row(row, spec).waiting_on()
        return InstanceSummary(row.id, row.process, row.status, row.project, row.created, row.updated,
                               waiting, row.parent_id, row.error)

    # -- transitions -------------------------------------------------------------

    def _allocate(self) -> int:
        iid = self._next_id
        self._next_id += 1
        return iid

    def _new_instance(self, iid: int, spec: ProcessSpec, fields: dict[str, Any],
                      parent: tuple[int, str] | None) -> Instance:
        merged = dict(spec.fields)
        if spec.project:
            merged["project"] = spec.project
        merged.update(fields)
        project = merged.get("project")
        now = self.clock.now()
        inst = Instance(iid, spec, merged, parent=parent, created=now, updated=now,
                        project=project if isinstance(project, str) else None)
        self._instances[iid] = inst
        return inst

    def _from_row(self, row: InstanceRow, spec: ProcessSpec) -> Instance:
        return Instance(row.id, spec, row.fields, status=Status(row.status), runs=row.runs,
                        parent=(row.parent_id, row.parent_path or "") if row.parent_id else None,
                        project=row.project, created=row.created, updated=row.updated,
                        serial=row.serial, error=row.error)

    async def _get(self, iid: int) -> Instance | None:
        inst = self._instances.get(iid)
        if inst is not None:
            return inst
        return (await self._load([iid])).get(iid)

    async def _load(self, ids: Iterable[int]) -> dict[int, Instance]:
        """Instances by id, from the cache or SQLite.  Each id is read once even
        when several callers ask at the same time (one object per instance)."""
        found: dict[int, Instance] = {}
        waits: list[tuple[int, asyncio.Future[Instance | None]]] = []
        todo: list[int] = []
        for iid in dict.fromkeys(ids):
            if iid in self._instances:
                found[iid] = self._instances[iid]
            elif iid in self._loading:
                waits.append((iid, self._loading[iid]))
            else:
                todo.append(iid)
        if todo:
            loop = asyncio.get_running_loop()
            futures = {iid: loop.create_future() for iid in todo}
            self._loading.update(futures)
            try:
                rows = {r.id: r for r in await self.store.load_instances(todo)}
                for iid in todo:
                    inst = None
                    row = rows.get(iid)
                    if row is not None:
                        inst = self._instances.get(iid) or await self._revive(row)
                        if not inst.status.finished:
                            self._instances[iid] = inst
                    futures[iid].set_result(inst)
                    if inst is not None:
                        found[iid] = inst
            except BaseException as exc:
                for future in futures.values():
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # retrieved: the caller gets exc itself
                raise
            finally:
                for iid in todo:
                    self._loading.pop(iid, None)
        for iid, future in waits:
            inst = await future
            if inst is not None:
                found[iid] = inst
        return found

    async def _revive(self, row: InstanceRow) -> Instance:
        return self._from_row(row, await self._spec_of(row))

    async def _spec_of(self, row: InstanceRow) -> ProcessSpec:
        """The definition an instance was launched with: today's, or the
        version stored when it was launched (edited or removed since)."""
        spec = self._known_spec(row)
        if spec is not None:
            return spec
        stored = await self.store.definition_source(row.definition) if row.definition else None
        if stored is None:
            raise EngineError(f"#{row.id}: process {row.process!r} is no longer defined")
        name, source = stored
        old, problems = parse_definition(loads_yaml(source, f"{name}@{row.definition}"),
                                         f"{name}@{row.definition}", name, None, source)
        if old is None:
            raise EngineError(f"#{row.id}: stored definition {name}@{row.definition} does not load: "
                              + "; ".join(map(str, problems)))
        if problems:
            # it passed the checks of the bot that launched it; a later bot's stricter
            # checks are for new launches, not a reason to strand what already runs
            log.warning("#%d: stored definition %s@%s fails today's checks (%s); running it as stored",
                        row.id, name, row.definition, "; ".join(map(str, problems)))
        log.info("#%d runs on an earlier version of %s (%s)", row.id, name, row.definition)
        self._old_specs[old.digest] = old
        return old

    def _known_spec(self, row: InstanceRow) -> ProcessSpec | None:
        current = self.specs.get(row.process)
        if current is not None and (not row.definition or row.definition == current.digest):
            return current
        return self._old_specs.get(row.definition or "")

    async def _require(self, iid: int) -> Instance:
        inst = await self._get(iid)
        if inst is None:
            raise NoSuchInstance(f"no instance #{iid}")
        return inst

    async def _transact(self, actions: list[tuple[int, Action]], extra: list[Op] | None = None) -> list[Any]:
        """Apply ``actions`` to their instances as one atomic transition,
        commit it (group commit), then announce it."""
        tx = Transition(self.clock.now(), self._allocate, self.tz)
        results = []
        try:
            for iid, action in actions:
                inst = self._instances.get(iid) or await self._get(iid)
                results.append(action(inst, tx))
            while tx.followups:
                await self._followup(tx, tx.followups.popleft())
        except EngineError:
            if tx.touched:  # a refusal after a change is a bug: forget the half-done state
                self._evict(tx)
            raise
        except Exception:
            self._evict(tx)
            raise
        ops = self._ops(tx, extra)
        try:
            await self.store.commit(ops)
        except Exception:
            self._evict(tx)
            raise
        self._announce(tx)
        return results

    async def _followup(self, tx: Transition, item: Launch | ChildFinished | CancelInstance) -> None:
        if isinstance(item, Launch):
            spec = self.specs.get(item.process)
            if spec is None or item.parent is None:
                tx.followups.append(ChildFinished(item.parent[0] if item.parent else 0,
                                                  item.parent[1] if item.parent else "", item.instance_id,
                                                  False, {}, f"cannot start: unknown process {item.process!r}"))
                return
            depth = await self._depth(item.parent[0])
            if depth > MAX_SUBPROCESS_DEPTH:
                log.error("#%d %s: subprocess %s not started: nested %d deep (a subprocess cycle?)",
                          item.parent[0], item.parent[1], item.process, depth)
                tx.followups.append(ChildFinished(
                    item.parent[0], item.parent[1], item.instance_id, False, {},
                    f"cannot start: {item.process!r} would be nested more than {MAX_SUBPROCESS_DEPTH} "
                    "subprocesses deep (a subprocess cycle?)"))
                return
            child = self._new_instance(item.instance_id, spec, item.fields, item.parent)
            child.start(tx, item.actor)
        elif isinstance(item, ChildFinished):
            parent = await self._get(item.parent_id)
            if parent is not None:
                parent.on_child_finished(tx, item)
        else:
            cancelled = await self._get(item.instance_id)
            if cancelled is not None and not cancelled.status.finished:
                cancelled.cancel(tx, item.actor)

    async def _depth(self, parent_id: int) -> int:
        """How deep a subprocess of ``parent_id`` would be: 1 under a top-level
        instance.  Counts no further than one past the limit."""
        depth, iid = 1, parent_id
        while depth <= MAX_SUBPROCESS_DEPTH:
            inst = await self._get(iid)
            if inst is None or inst.parent is None:
                break
            depth += 1
            iid = inst.parent[0]
        return depth

    def _evict(self, tx: Transition) -> None:
        for iid in tx.touched:
            self._instances.pop(iid, None)

    def _ops(self, tx: Transition, extra: list[Op] | None) -> list[Op]:
        store = self.store
        ops: list[Op] = []
        ops.append(store.instance_op([
            (i.id, i.spec.name, i.status.value, i.parent[0] if i.parent else None,
             i.parent[1] if i.parent else None, i.project, dumps(i.fields), dumps(i.runs), i.serial,
             i.error, i.created, i.updated, i.spec.digest or None) for i in tx.touched.values()]))
        if tx.history:
            ops.append(store.history_op([(e.instance_id, e.at, e.path, e.step, e.event, e.actor, e.detail)
                                         for e in tx.history]))
        gone = set(tx.cancelled) | set(tx.closed)
        tx.dispatch = [w for w in tx.dispatch if w.key not in gone]
        if tx.dispatch:
            ops.append(store.workitem_insert_op([
                (w.key, w.instance_id, w.process, w.path, w.step, w.participant, dumps(w.params),
                 dumps(w.fields), tx.now) for w in tx.dispatch]))
        if tx.pending:
            ops.append(store.workitem_state_op(tx.pending, "pending"))
        if tx.cancelled:
            ops.append(store.workitem_state_op(tx.cancelled, "cancelling"))
        if tx.closed:
            ops.append(store.workitem_delete_op(tx.closed))
        for op, key, due in tx.timer_ops:
            if op == "add":
                ops.append(store.timer_insert_op([(key.instance_id, key.path, key.kind, key.name, due)]))
            elif op == "del":
                ops.append(store.timer_delete_op([(key.instance_id, key.path, key.kind, key.name)]))
            elif op == "del_step":
                ops.append(store.timer_delete_step_op([key]))
            else:
                ops.append(store.timer_fired_op([(key.instance_id, key.path, key.kind, key.name)]))
        if extra:
            ops.extend(extra)
        return ops

    def _announce(self, tx: Transition) -> None:
        for iid, inst in tx.touched.items():
            if inst.status.finished:
                self._instances.pop(iid, None)
        self.bus.publish(tx.history)
        for wi in tx.dispatch:
            self._spawn(self._consume(wi))
        dispatched = {w.key for w in tx.dispatch}
        told = [k for k in tx.cancelled if k not in dispatched]
        if told:
            self._spawn(self._tell_cancelled(told))
        gone = set(tx.cancelled) | set(tx.closed)
        for timer, key in tx.deliveries:
            if key not in gone:   # a step cancelled in the same batch hears no more reminders
                self._spawn(self._deliver_timer(timer, key))
        dues = [due for op, _key, due in tx.timer_ops if op == "add"]
        if dues:
            self.timers.notify(min(dues))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine task failed", exc_info=task.exception())

    # -- participants ------------------------------------------------------------

    async def _consume(self, wi: Workitem) -> None:
        participant = self.participants.get(wi.participant)
        if participant is None:
            reply = Reply.failed(f"participant {wi.participant!r} is not available")
        else:
            try:
                reply = await participant.consume(wi)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("#%d %s: participant %s raised %s: %s", wi.instance_id, wi.step,
                            wi.participant, type(exc).__name__, exc)
                reply = Reply.failed(f"{type(exc).__name__}: {exc}")
        path, key = wi.path, wi.key
        if reply.kind == "pending":
            await self._transact([(wi.instance_id, lambda i, tx: i.on_pending(tx, path, key) if i else False)])
        else:
            await self._transact([(wi.instance_id,
                                   lambda i, tx: i.on_reply(tx, path, key, reply) if i else False)])

    async def _tell_cancelled(self, keys: list[str]) -> None:
        rows = await self.store.workitems(keys=keys)
        for row in rows:
            participant = self.participants.get(row.participant)
            if participant is not None:
                try:
                    await participant.cancel(_workitem(row))
                except Exception:
                    log.exception("#%d %s: participant %s failed to cancel", row.instance_id, row.step,
                                  row.participant)
        if rows:
            await self.store.commit([self.store.workitem_delete_op([r.key for r in rows])])

    async def _deliver_timer(self, timer: TimerKey, key: str | None) -> None:
        """Hand a fired event timer to its participant.  The timer row goes only
        with what the delivery caused: in the transition applying the
        participant's answer, or after the call when there is none.  A crash
        before that leaves it marked fired, and ``start`` delivers it again (at
        least once: the workitem key and the timer name identify it)."""
        rows = await self.store.workitems(instance_id=timer.instance_id)
        row = next((r for r in rows if r.path == timer.path and r.state != "cancelling"
                    and (key is None or r.key == key)), None)
        reply = None
        if row is not None:
            participant = self.participants.get(row.participant)
            if participant is not None:
                try:
                    reply = await participant.on_timer(_workitem(row), timer.event, f"{row.key}/{timer.name}")
                except Exception:
                    log.exception("#%d %s: participant %s failed on timer %s", row.instance_id, row.step,
                                  row.participant, timer.event)
        if reply is not None and reply.kind not in ("done", "failed"):
            log.warning("#%d %s: timer %s answered %s; only done or failed answer a step",
                        timer.instance_id, row.step if row else timer.path, timer.event, reply.kind)
            reply = None
        if reply is None or row is None:
            await self.store.commit([self.store.timer_delete_op(
                [(timer.instance_id, timer.path, timer.kind, timer.name)])])
            return
        path, wkey, answer, actor = row.path, row.key, reply, f"timer {timer.event}"

        def act(inst: Instance | None, tx: Transition) -> bool:
            tx.timer_ops.append(("del", timer, 0.0))   # first: the answer may re-arm the same timer
            return inst.on_reply(tx, path, wkey, answer, actor) if inst else False
        await self._transact([(timer.instance_id, act)])

    # -- timers and schedules ----------------------------------------------------

    async def _fire_timers(self, rows: list[TimerRow]) -> None:
        steps = [r for r in rows if r.instance_id != 0]
        for row in rows:
            if row.instance_id == 0:
                await self._fire_schedule(row)
        if not steps:
            return
        await self._load(r.instance_id for r in steps)   # one read for the whole batch

        def on_timer(row: TimerRow) -> Action:
            key = TimerKey(row.instance_id, row.path, row.kind, row.name)

            def act(inst: Instance | None, tx: Transition) -> None:
                if inst is None or inst.status.finished:
                    tx.timer_ops.append(("del", key, 0.0))
                else:
                    inst.on_timer(tx, key)
            return act
        await self._transact([(r.instance_id, on_timer(r)) for r in steps])

    async def _fire_schedule(self, row: TimerRow) -> None:
        spec = self.schedule_specs.get(row.path)
        if spec is None:
            await self.store.commit(self.store.schedule_forget_op(row.path))
            return
        now = self.clock.now()
        nxt = next_cron(spec.cron, now, spec.timezone)
        process = self.specs.get(spec.process)
        if process is None:
            log.error("schedule %s: process %r is not defined; skipped", spec.name, spec.process)
            await self.store.commit(self.store.schedule_ops(spec.name, spec.rule, None, nxt))
            return
        inst = self._new_instance(self._allocate(), process, dict(spec.fields), None)
        actor = f"schedule {spec.name}"
        await self._transact([(inst.id, lambda i, tx: i.start(tx, actor))],  # type: ignore[union-attr]
                             extra=self.store.schedule_ops(spec.name, spec.rule, now, nxt))
        self.timers.notify(nxt)
        log.info("#%d %s launched by schedule %s (late by %.1f s); next run %s", inst.id, spec.process,
                 spec.name, max(0.0, now - row.due), _iso(nxt))

    async def _sync_schedules(self) -> None:
        stored = await self.store.schedules()
        due = await self.store.schedule_timers()
        now = self.clock.now()
        ops: list[Op] = []
        for spec in self.schedule_specs.values():
            known = stored.get(spec.name)
            when = due.get(spec.name)
            if known is None or known[0] != spec.rule or when is None:
                nxt = next_cron(spec.cron, now, spec.timezone)
                ops += self.store.schedule_ops(spec.name, spec.rule, None, nxt)
                log.info("schedule %s (%s -> %s): next run %s", spec.name, spec.rule, spec.process, _iso(nxt))
            elif when <= now:
                if spec.misfire == "run_once":
                    log.warning("schedule %s missed its run at %s while the bot was down; "
                                "running it once now (misfire: run_once)", spec.name, _iso(when))
                else:
                    nxt = next_cron(spec.cron, now, spec.timezone)
                    ops += self.store.schedule_ops(spec.name, spec.rule, None, nxt)
                    log.warning("schedule %s missed its run at %s while the bot was down; skipped "
                                "(misfire: skip); next run %s", spec.name, _iso(when), _iso(nxt))
        for name in stored:
            if name not in self.schedule_specs:
                ops += self.store.schedule_forget_op(name)
                log.info("schedule %s is no longer configured; forgotten", name)
        if ops:
            await self.store.commit(ops)


def _parse_key(key: str) -> tuple[int, str]:
    head, _, rest = key.partition(":")
    path, sep, generation = rest.rpartition(":")
    if not head.isdigit() or not sep or not generation.isdigit():
        raise NoSuchWorkitem(f"bad workitem key {key!r}")
    return int(head), path


def _workitem(row: WorkitemRow) -> Workitem:
    return Workitem(row.key, row.instance_id, row.process, row.path, row.step, row.participant,
                    row.params, row.fields)


def _iso(ts: float) -> str:
    from time import gmtime, strftime
    return strftime("%Y-%m-%d %H:%M:%SZ", gmtime(ts))
