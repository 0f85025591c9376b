"""The engine: launch, dispatch, reply, cancel, retry -- write, then announce.

Every change runs as a ``Transition`` over one or more instances (a
subprocess launch or completion touches two), is committed to SQLite by the
store's group-commit writer, and only then announced: events published,
workitems handed to participants, timers armed.  Nothing a participant or a
person sees can be lost by a crash after it was seen.

Transitions are atomic in memory too.  One transition is applied at a time,
from its first change to its being queued for commit, so none sees another's
half-done changes, even across an await (loading an instance).  The
transitions applied in one pass of the event loop are committed together, all
or none, each instance's row written once, in its final state: replies that
reach one instance at once share one commit and one serialisation.  An
instance with a commit in flight is changed again only once that commit is
settled, so no transition builds on changes that may yet fail to be written.
When a commit fails, its instances are forgotten and read again from SQLite
(their last committed state); the transitions in it that were not to blame
(the store names the culprits) are applied again from there.

Recovery at start (``Engine.start``): workitems that were dispatched but not
answered are dispatched again with the same key; pending ones stay pending;
cancellations and fired reminders not yet delivered are delivered; timers are
re-armed from SQLite, and overdue ones fire once.  Instances are loaded
lazily, when something happens to them, so start-up does not grow with the
number of waiting instances.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

from engine.definitions import ProcessSpec, known_fields, launch_fields, parse_definition
from engine.errors import (AlreadyLaunched, BadFields, EngineError, NoSuchInstance, NoSuchWorkitem, NotAllowedNow,
                           UnknownProcess)
from engine.events import Event, EventBus
from engine.instances import ACTIVE, CancelInstance, ChildFinished, Instance, Launch, Status, Transition
from engine.participant_runtime import ParticipantEnv, participant_services
from engine.participants import ParticipantRegistry, Reply, Workitem
from engine.runs import RunState, runs_from_json, runs_to_json
from engine.schedules import ScheduleInfo as ScheduleInfo   # re-exported: bot/rendering.py imports it from here
from engine.schedules import ScheduleSpec, Schedules
from engine.store import InstanceRow, NotWritten, Op, Store, StoreError, TimerRow, WorkitemRow
from engine.timerops import SCHEDULE_OWNER, DropTimer, TimerKey, event_name
from engine.timers import Clock, SystemClock, TimerService
from engine.yamlconfig import loads_yaml

log = logging.getLogger(__name__)

_ACTIVE_NAMES = frozenset(s.value for s in ACTIVE)
# A subprocess starts in the same transition as the step that calls it, so a
# cycle of definitions (a calls b calls a) would build instances without end
# and never yield.  Validation reports cycles; this bounds what slips past it
# (an instance running an earlier version of a definition, say).
MAX_SUBPROCESS_DEPTH = 32
# How often a transition is applied again when the commit it shared failed
# through no fault of its own.
_ATTEMPTS = 3
# Launch tokens (``launch --once TOKEN``, a mail's Message-ID, a schedule run)
# are kept this long: a launch repeated within it is answered "already launched".
TOKEN_KEEP = 8 * 86400.0
_TOKEN = re.compile(r"[^\s\x00-\x1f\x7f]{1,200}")
R = TypeVar("R")
# What a transition does to one instance (None: no such instance, or a launch that makes one).
Action = Callable[[Instance | None, Transition], R]
Watcher = Callable[[Sequence[Event]], Sequence[Op]]
"""Sees every transition's history events, inside the transition; what it
returns is written in the same commit (``Engine.watch``)."""
Ack = Callable[[Any], Sequence[Op]]
"""Given an operation's result (launch: the instance id; cancel: None; retry:
what started again), the rows that record its answer, written in the
operation's own commit (a durable acknowledgement)."""


class _TryAgain(Exception):
    """The commit a transition shared failed through another's fault: apply it again."""


@dataclass(slots=True)
class _Queued:
    """A transition applied in memory, waiting to be committed."""
    tx: Transition
    ops: list[Op]                       # its own statements (instance rows are written per pass)
    written: asyncio.Future[None]


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
    handled: str = ""          # the last failure an on_error dealt with ("step: message")

    @property
    def outcome(self) -> str:
        """"recovered" for an instance that completed because an on_error
        dealt with a failure (skipped the step, or ran a handler that
        completed); "" otherwise."""
        return "recovered" if self.status == "completed" and self.handled else ""


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
                 timezone: str = "UTC", participant_env: ParticipantEnv | None = None) -> None:
        self.store = store
        self.specs = dict(specs)
        self.participants = participants
        self.clock = clock or SystemClock()
        self.bus = bus or EventBus()
        self.timers = TimerService(store, self._fire_timers, self.clock, use_scheduler)
        self._schedules = Schedules(schedules, store, self.timers, self.clock, self._scheduled)
        self._instances: dict[int, Instance] = {}
        self._loading: dict[int, asyncio.Future[Instance | None]] = {}
        self._applying = asyncio.Lock()                 # held while a transition is applied
        self._pass: list[_Queued] = []                  # applied in this pass, not yet committed
        self._submit_due = False
        self._unsettled: dict[int, asyncio.Future[None]] = {}   # instance -> its commit in flight
        self._next_id = 1
        self.tz = ZoneInfo(timezone)
        self._old_specs: dict[str, ProcessSpec] = {}     # earlier versions still running somewhere
        self._known: dict[str, frozenset[str]] = {}      # process -> the launch fields it knows
        self._tokens: dict[str, tuple[object, int, float]] = {}   # token -> (claim, instance, when): this run's
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = False
        self.participant_env = participant_env or ParticipantEnv()   # config, users: for participants' setup
        self._watchers: list[Watcher] = []

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        self._next_id = await self.store.max_instance_id() + 1
        now = self.clock.now()
        await self.store.commit([self.store.definition_op(
            [(s.digest, s.name, s.source, now, s.language) for s in self.specs.values() if s.digest])])
        for participant in self.participants.all():
            await participant.setup(await participant_services(self, participant, self.participant_env))
        await self._schedules.sync()
        redo = await self.store.workitems(state="dispatched")
        for row in redo:
            self._spawn(self._consume(_workitem(row)))
        cancelling = await self.store.workitems(state="cancelling")
        if cancelling:
            self._spawn(self._tell_cancelled([r.key for r in cancelling]))
        for timer in await self.store.fired_timers():
            self._spawn(self._deliver_timer(timer.key, None))
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

    async def launch(self, process: str, fields: Mapping[str, Any] | None = None, *, actor: str = "",
                     token: str | None = None, ack: Ack | None = None) -> int:
        """Start an instance of ``process``.  ``fields`` must be fields the
        definition knows (``definitions.known_fields``; any, with
        ``extra_fields: allow``); text is converted to the type its ``inputs``
        declare.  With ``token``, at most one launch of this process into this
        project per token within ``TOKEN_KEEP``: a repeat raises AlreadyLaunched
        naming the instance (the same token for another process or project is
        another token).  ``ack(instance_id)``: rows written in the launch's commit."""
        spec = self.specs.get(process)
        if spec is None:
            raise UnknownProcess(f"unknown process {process!r}")
        if token is not None and not _TOKEN.fullmatch(token):
            raise EngineError("a launch token is 1 to 200 characters, without spaces or control characters")
        values = self._checked(spec, fields) if fields else {}
        if token is not None:
            # a token belongs to the process and project it launches: a launch elsewhere can
            # neither learn that it was used (nor the instance's id) nor use it up
            token = f"launch {process} {values.get('project', spec.project) or '-'} {token}"
        iid = await self._launch(process, values, actor, token=token, ack=ack)
        log.info("#%d %s launched by %s", iid, process, actor or "engine")
        return iid

    def _checked(self, spec: ProcessSpec, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``fields`` for a launch or retry of ``spec``: known, and converted by its inputs."""
        key = spec.digest or spec.name
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = known_fields(spec, self.specs)
        try:
            return launch_fields(spec, fields, known=known)
        except ValueError as exc:
            raise BadFields(str(exc)) from None

    async def _launch(self, process: str, fields: Mapping[str, Any], actor: str, extra: Sequence[Op] = (),
                      token: str | None = None, ack: Ack | None = None) -> int:
        """Start an instance of ``process``; ``extra`` is written in the same commit,
        and so is ``token`` (see ``launch``)."""
        spec = self.specs.get(process)
        if spec is None:
            raise UnknownProcess(f"unknown process {process!r}")
        if token is not None:
            held = self._tokens.get(token)
            since = self.clock.now() - TOKEN_KEEP
            earlier = held[1] if held is not None and held[2] >= since else await self.store.launch_token(token, since)
            if earlier is not None:
                raise AlreadyLaunched(earlier)
        claim = object()

        def start(_: Instance | None, tx: Transition) -> int:
            if token is not None:
                # launches with one token that passed the lookup together: the first one applied wins
                held = self._tokens.get(token)
                if held is not None and held[0] is not claim and held[2] >= tx.now - TOKEN_KEEP:
                    raise AlreadyLaunched(held[1])
            inst = self._new_instance(tx.allocate_id(), spec, dict(fields), None, tx.now)
            if token is not None:
                self._hold_token(token, claim, inst.id, tx.now)
                tx.extra.extend(self.store.launch_token_ops(token, inst.id, tx.now, tx.now - TOKEN_KEEP))
            inst.start(tx, actor)
            if ack is not None:
                tx.extra.extend(ack(inst.id))
            return inst.id
        try:
            [iid] = await self._transact([(None, start)], extra)
        except BaseException:
            held = self._tokens.get(token) if token is not None else None
            if token is not None and held is not None and held[0] is claim:
                del self._tokens[token]
            raise
        return iid

    async def _scheduled(self, process: str, fields: Mapping[str, Any], actor: str, extra: Sequence[Op],
                         token: str) -> int:
        """A schedule's run (its fields were checked with the configuration)."""
        return await self._launch(process, fields, actor, extra, token)

    def _hold_token(self, token: str, claim: object, iid: int, now: float) -> None:
        """Remember a token launched by this engine (the database has it once committed;
        until then, this is what stops a second launch with it)."""
        if len(self._tokens) >= 1000:
            for old in [t for t, (_c, _i, when) in self._tokens.items() if when < now - TOKEN_KEEP]:
                del self._tokens[old]
        self._tokens[token] = (claim, iid, now)

    async def reply(self, key: str, reply: Reply, *, actor: str = "") -> None:
        """Answer a dispatched or pending workitem (participants, approvals)."""
        if reply.kind not in ("done", "failed"):
            raise NotAllowedNow(f"a reply to {key} must be done or failed, not {reply.kind}")
        iid, path = _parse_key(key)
        inst = await self._get(iid)
        if inst is None:
            raise NoSuchWorkitem(f"no open step {key}")
        accepted = await self._transact([(iid, lambda i, tx: i.on_reply(tx, path, key, reply, actor)
                                          if i else False)])
        if not accepted[0]:
            raise NoSuchWorkitem(f"step {key} is not open any more (answered, cancelled or unknown)")

    async def cancel(self, instance_id: int, *, actor: str = "", ack: Ack | None = None) -> None:
        """``ack(None)``: rows written in the cancellation's commit."""
        await self._require(instance_id)

        def cancel(i: Instance | None, tx: Transition) -> None:
            _must(i, instance_id).cancel(tx, actor)
            if ack is not None:
                tx.extra.extend(ack(None))
        await self._transact([(instance_id, cancel)])
        log.info("#%d cancelled by %s", instance_id, actor or "engine")

    async def retry(self, instance_id: int, *, actor: str = "", fields: Mapping[str, Any] | None = None,
                    handler: bool = False, ack: Ack | None = None) -> list[str]:
        """Start an instance's failed steps again, after setting ``fields`` (the
        fix, if it is data; checked and converted as for a launch).  A step
        whose error handler failed resumes where its work stopped; with
        ``handler``, the failed handlers run again instead.  Returns what was
        started again: step names, or with ``handler`` the handlers' processes."""
        inst = await self._require(instance_id)
        values = self._checked(inst.spec, fields) if fields else None
        [names] = await self._transact([(instance_id, lambda i, tx: _must(i, instance_id).retry(
            tx, actor, values, handler))])
        log.info("#%d retried by %s: %s", instance_id, actor or "engine", ", ".join(names))
        return names

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher`` inside every transition with its history events
        (each carrying its instance's project); the ops it returns are written
        in the transition's commit, so they are durable exactly when the
        transition is (the outbox's routes, a lock released when its instance
        ends).  It runs while the transition is applied: fast, no I/O.  One
        that raises is logged and its rows for that transition are lost,
        rather than stopping every transition."""
        self._watchers.append(watcher)

    async def open_keys(self, participant: str) -> frozenset[str]:
        """Dispatch keys of ``participant``'s open workitems (dispatched, pending or being cancelled)."""
        return frozenset(await self.store.workitem_keys(participant))

    async def project_of(self, instance_id: int) -> str | None:
        inst = self._instances.get(instance_id)
        if inst is not None:                # running here: no need to read it
            return inst.project
        return (await self.summary(instance_id)).project

    async def step_timers(self, workitem: Workitem) -> list[tuple[str, float]]:
        """The workitem's named step timers not fired yet: (name, due), soonest first."""
        rows = await self.store.timers_of(workitem.instance_id)
        return sorted(((event_name(t.name), t.due) for t in rows
                       if t.kind == "event" and t.path == workitem.path and not t.fired), key=lambda t: t[1])

    async def launched_by(self, instance_id: int) -> str | None:
        """The actor recorded when the instance was launched ("alice via irc:libera",
        "schedule nightly"), or None."""
        return await self.store.launcher(instance_id) or None

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
        return await self.store.count_instances(include_finished, projects)

    async def summary(self, instance_id: int) -> InstanceSummary:
        rows = await self.store.load_instances([instance_id])
        if not rows:
            raise NoSuchInstance(f"no instance #{instance_id}")
        return self._summary(rows[0])

    async def definition_of(self, instance_id: int) -> ProcessSpec:
        """The definition an instance runs on: today's, or the version (and
        definition language) stored when it was launched."""
        rows = await self.store.load_instances([instance_id])
        if not rows:
            raise NoSuchInstance(f"no instance #{instance_id}")
        return await self._spec_of(rows[0])

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
        runs = runs_from_json(row.runs)
        for path, run in sorted(runs.items()):
            if run.state is RunState.ACTIVE:
                continue
            step = spec.find(path) if spec else None
            name = (step.name if step.path else "process") if step else path
            what = f" ({step.participant})" if step and step.participant else ""
            extra = f" [key {run.key}]" if run.key is not None else ""
            extra += f" [subprocess #{run.child}]" if run.child is not None else ""
            extra += f": {run.error}" if run.error else ""
            steps.append(f"{name}{what}: {run.state.value}{extra}")
        timers = []
        for t in await self.store.timers_of(instance_id):
            step = spec.find(t.path) if spec else None
            timers.append((event_name(t.name) if t.kind == "event" else t.kind,
                           step.name if step else (t.path or "process"), t.due, bool(t.fired)))
        children = [r.child for r in runs.values() if r.child is not None]
        return InstanceDetail(self._summary(row), row.fields, steps, timers, children)

    async def history(self, instance_id: int) -> list[Event]:
        summary = await self.summary(instance_id)
        rows = await self.store.history(instance_id)
        return [Event(r.instance_id, summary.process, r.at, r.path, r.step, r.event, r.actor, r.detail)
                for r in rows]

    async def schedules(self) -> list[ScheduleInfo]:
        return await self._schedules.info()

    def _summary(self, row: InstanceRow) -> InstanceSummary:
        waiting = ""
        spec = self._known_spec(row)
        if spec is not None and row.status in _ACTIVE_NAMES:
            waiting = self._from_row(row, spec).waiting_on()
        return InstanceSummary(row.id, row.process, row.status, row.project, row.created, row.updated,
                               waiting, row.parent_id, row.error, row.handled)

    # -- transitions -------------------------------------------------------------

    def _allocate(self) -> int:
        iid = self._next_id
        self._next_id += 1
        return iid

    def _new_instance(self, iid: int, spec: ProcessSpec, fields: dict[str, Any],
                      parent: tuple[int, str] | None, now: float) -> Instance:
        merged = dict(spec.fields)
        if spec.project:
            merged["project"] = spec.project
        merged.update(fields)
        project = merged.get("project")
        inst = Instance(iid, spec, merged, parent=parent, created=now, updated=now,
                        project=project if isinstance(project, str) else None)
        self._instances[iid] = inst
        return inst

    def _from_row(self, row: InstanceRow, spec: ProcessSpec) -> Instance:
        return Instance(row.id, spec, row.fields, status=Status(row.status), runs=runs_from_json(row.runs),
                        parent=(row.parent_id, row.parent_path or "") if row.parent_id else None,
                        project=row.project, created=row.created, updated=row.updated,
                        serial=row.serial, error=row.error, handled=row.handled)

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
        stored = await self.store.stored_definition(row.definition) if row.definition else None
        if stored is None:
            raise EngineError(f"#{row.id}: process {row.process!r} is no longer defined")
        name, source, language = stored
        old, problems = parse_definition(loads_yaml(source, f"{name}@{row.definition}"),
                                         f"{name}@{row.definition}", name, None, source, language)
        if old is None:
            raise EngineError(f"#{row.id}: stored definition {name}@{row.definition} does not load: "
                              + "; ".join(map(str, problems)))
        if problems:
            # it passed the checks of the bot that launched it; a later bot's stricter
            # checks are for new launches, not a reason to strand what already runs
            log.warning("#%d: stored definition %s@%s fails today's checks (%s); running it as stored",
                        row.id, name, row.definition, "; ".join(map(str, problems)))
        log.info("#%d runs on an earlier version of %s (%s, language %d)", row.id, name, row.definition, language)
        self._old_specs[row.definition or old.digest] = old
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

    async def _transact(self, actions: Sequence[tuple[int | None, Action[R]]],
                        extra: Sequence[Op] = ()) -> list[R]:
        """Apply ``actions`` to their instances as one atomic transition, then
        commit it (with this pass's others), then announce it.  ``extra``: see
        ``Transition.extra``."""
        for attempt in range(1, _ATTEMPTS + 1):
            for iid, _action in actions:       # wait for commits in flight without holding others up
                await self._settled(iid)
            await self._applying.acquire()     # no await in fact unless one is half-way
            tx = Transition(self.clock.now(), self._allocate, self.tz, extra=list(extra))
            try:
                results = []
                for iid, action in actions:
                    inst = None if iid is None else self._instances.get(iid)
                    if iid is not None and (inst is None or iid in self._unsettled):
                        inst = await self._ready(iid)
                    results.append(action(inst, tx))
                while tx.followups:
                    await self._followup(tx, tx.followups.popleft())
                written = self._queue(tx)
            except BaseException:
                # a refusal changes nothing; anything else that breaks off half-way is a
                # bug, and the half-done changes must not be written by anyone
                if tx.touched:
                    self._abandon(tx)
                self._schedule_submit()    # what others queued meanwhile
                raise
            finally:
                self._applying.release()
            try:
                await written
            except _TryAgain:
                if attempt < _ATTEMPTS:
                    continue
                raise StoreError(f"transition not written: its commit failed {_ATTEMPTS} times") from None
            self._announce(tx)
            return results
        raise AssertionError("unreachable")

    async def _ready(self, iid: int | None) -> Instance | None:
        """The instance to change, once no commit of an earlier change to it is
        in flight (a transition must not build on what may yet fail)."""
        if iid is None:
            return None
        await self._settled(iid)
        return await self._get(iid)

    async def _settled(self, iid: int | None) -> None:
        while iid is not None and (in_flight := self._unsettled.get(iid)) is not None:
            await asyncio.wait([in_flight])

    def _queue(self, tx: Transition) -> asyncio.Future[None]:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pass.append(_Queued(tx, self._ops(tx), written))
        self._schedule_submit()
        return written

    def _schedule_submit(self) -> None:
        if self._pass and not self._submit_due:
            self._submit_due = True
            asyncio.get_running_loop().call_soon(self._submit)

    def _submit(self) -> None:
        """Commit this pass's transitions together: each its own statements, and
        the rows of the instances they changed, each once, in its final state."""
        self._submit_due = False
        if self._applying.locked() or not self._pass:
            return   # one is half-way: its changes must not be written yet; it submits when done
        queued, self._pass = self._pass, []
        instances: dict[int, Instance] = {}
        for q in queued:
            instances.update(q.tx.touched)
        try:
            rows = self.store.instance_op([_row(inst) for inst in instances.values()])
            committed = self.store.commit(*(q.ops for q in queued), shared=[rows])
        except Exception as exc:   # not even queued: fails like a commit, so nobody waits for ever
            committed = asyncio.get_running_loop().create_future()
            committed.set_exception(exc)
        for iid in instances:
            self._unsettled[iid] = committed
        committed.add_done_callback(functools.partial(self._settle, queued, instances))

    def _settle(self, queued: list[_Queued], instances: dict[int, Instance],
                committed: asyncio.Future[None]) -> None:
        """A pass's commit is done: tell its transitions.  After a failure, forget
        its instances (the next use reads their last committed state); the
        transitions not to blame are applied again."""
        for iid in instances:
            if self._unsettled.get(iid) is committed:
                del self._unsettled[iid]
        failure = StoreError("commit cancelled") if committed.cancelled() else committed.exception()
        blamed: frozenset[int] = frozenset()
        if failure is not None:
            for iid, inst in instances.items():
                if self._instances.get(iid) is inst:
                    del self._instances[iid]
            if isinstance(failure, NotWritten):
                blamed = failure.blamed
            if blamed and len(queued) > len(blamed):
                log.warning("%d of %d transitions committed together failed; the others are applied again",
                            len(blamed), len(queued))
        for index, q in enumerate(queued):
            if q.written.done():       # its caller was cancelled
                continue
            if failure is None:
                q.written.set_result(None)
            elif blamed and index not in blamed:
                q.written.set_exception(_TryAgain())
            else:
                q.written.set_exception(failure)

    def _abandon(self, tx: Transition) -> None:
        """``tx`` broke off after changing instances.  Forget what it touched,
        and what this pass's other uncommitted transitions touched (they may
        have built on it, or it on them): those are applied again."""
        doomed, self._pass = self._pass, []
        for q in doomed:
            if not q.written.done():   # done: its caller was cancelled
                q.written.set_exception(_TryAgain())
        for touched in (tx.touched, *(q.tx.touched for q in doomed)):
            for iid, inst in touched.items():
                if self._instances.get(iid) is inst:
                    del self._instances[iid]

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
            child = self._new_instance(item.instance_id, spec, item.fields, item.parent, tx.now)
            child.start(tx, item.actor)
        elif isinstance(item, ChildFinished):
            parent = await self._ready(item.parent_id)
            if parent is not None:
                parent.on_child_finished(tx, item)
        else:
            cancelled = await self._ready(item.instance_id)
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

    def _ops(self, tx: Transition) -> list[Op]:
        """The transition's own statements: all it writes but its instances' rows."""
        store = self.store
        ops: list[Op] = []
        if tx.history:
            ops.append(store.history_op(tx.history))
        gone = set(tx.cancelled) | set(tx.closed)
        tx.dispatch = [w for w in tx.dispatch if w.key not in gone]
        if tx.dispatch:
            ops.append(store.workitem_insert_op(tx.dispatch, tx.now))
        if tx.pending:
            ops.append(store.workitem_state_op(tx.pending, "pending"))
        if tx.cancelled:
            ops.append(store.workitem_state_op(tx.cancelled, "cancelling"))
        if tx.closed:
            ops.append(store.workitem_delete_op(tx.closed))
        ops += store.timer_ops(tx.timer_ops)
        ops += tx.extra
        if self._watchers and tx.history:
            for watcher in self._watchers:
                try:
                    ops += watcher(tx.history)
                except Exception:
                    log.exception("a transition watcher failed; its rows for this transition are not written")
        return ops

    def _announce(self, tx: Transition) -> None:
        for iid, inst in tx.touched.items():
            if inst.status.finished and self._instances.get(iid) is inst:
                del self._instances[iid]
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
        self.timers.note(tx.timer_ops)

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
            await self._transact([(wi.instance_id, lambda i, tx: i.on_pending(tx, path, key, reply) if i else False)])
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
        if reply is None or row is None:
            await self.store.commit(self.store.timer_ops([DropTimer(timer)]))
            return
        path, wkey, answer, actor = row.path, row.key, reply, f"timer {timer.event}"

        def act(inst: Instance | None, tx: Transition) -> bool:
            tx.timer_ops.append(DropTimer(timer))   # first: the answer may re-arm the same timer
            if inst is None:
                return False
            if answer.kind == "pending":            # still waiting: what the timer did is written with its end
                return inst.on_note(tx, path, wkey, answer)
            return inst.on_reply(tx, path, wkey, answer, actor)
        await self._transact([(timer.instance_id, act)])

    # -- timers ------------------------------------------------------------------

    async def _fire_timers(self, rows: list[TimerRow]) -> None:
        steps = [r for r in rows if r.instance_id != SCHEDULE_OWNER]
        for row in rows:
            if row.instance_id == SCHEDULE_OWNER:
                await self._schedules.fire(row)
        if not steps:
            return
        await self._load(r.instance_id for r in steps)   # one read for the whole batch

        def on_timer(key: TimerKey) -> Action[None]:
            def act(inst: Instance | None, tx: Transition) -> None:
                if inst is None or inst.status.finished:
                    tx.timer_ops.append(DropTimer(key))
                else:
                    inst.on_timer(tx, key)
            return act
        await self._transact([(r.instance_id, on_timer(r.key)) for r in steps])


def _parse_key(key: str) -> tuple[int, str]:
    head, _, rest = key.partition(":")
    path, sep, generation = rest.rpartition(":")
    if not (head.isascii() and head.isdigit()) or not sep or not (generation.isascii() and generation.isdigit()):
        raise NoSuchWorkitem(f"bad workitem key {key!r}")
    return int(head), path


def _workitem(row: WorkitemRow) -> Workitem:
    return Workitem(row.key, row.instance_id, row.process, row.path, row.step, row.participant,
                    row.params, row.fields)


def _must(inst: Instance | None, iid: int) -> Instance:
    if inst is None:
        raise NoSuchInstance(f"no instance #{iid}")
    return inst


def _row(inst: Instance) -> InstanceRow:
    """The instance as the store writes it."""
    parent_id, parent_path = inst.parent if inst.parent else (None, None)
    return InstanceRow(inst.id, inst.spec.name, inst.status.value, parent_id, parent_path, inst.project,
                       inst.fields, runs_to_json(inst.runs), inst.serial, inst.error, inst.created, inst.updated,
                       inst.spec.digest or None, inst.handled)
