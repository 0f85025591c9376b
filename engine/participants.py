"""The participant contract: a workflow step's worker.

``consume`` gets a ``Workitem`` and answers with a ``Reply``: done (with
fields to merge), failed (error text), or pending -- the participant keeps
the workitem and answers later through ``services.reply(key, ...)`` (human
approvals, remote work).  ``key`` is stable across re-dispatch after a crash,
so a participant with side effects uses it to act at most once.

A participant's life:

1. ``check_config(section)``: its own section of bot.yaml
   (``participants: {<name>: {...}}``), checked by ``run_bot.py check`` and at
   start with the other configuration (problems as ``file:line``).  What it
   returns reaches ``setup`` as ``services.config``.
2. ``check_params(params, config)``: each step that uses it, as written in the
   definition (templates not rendered yet), when definitions are checked.
3. ``migrations``: its own tables, created and changed by numbered SQL
   scripts the store runs before ``setup`` (``engine.participant_runtime``).
4. ``setup(services)``: once at start, before any workitem: configuration,
   clock, user directory, ``reply``, storage.
5. ``consume`` / ``on_timer`` / ``cancel`` for each step; ``shutdown`` at a
   clean stop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, ClassVar, Mapping, Protocol, Sequence

from engine.configkit import Section
from engine.errors import ReleasebotError

if TYPE_CHECKING:
    from engine.events import Event
    from engine.participant_runtime import Storage
    from engine.store import Op


@dataclass(frozen=True)
class Workitem:
    key: str                  # dispatch key: instance:path:generation; stable across re-dispatch
    instance_id: int
    process: str
    path: str
    step: str                 # the step's name as people see it
    participant: str
    params: Mapping[str, Any]     # rendered: templates already evaluated over the fields
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Reply:
    kind: str                 # "done" | "failed" | "pending"
    fields: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    ops: tuple[Op, ...] = ()
    """Statements on the participant's own tables (``services.storage.op``)
    written in the same commit as the transition that applies this answer,
    and only if the answer is applied (the step was still open)."""
    events: tuple[tuple[str, str], ...] = ()
    """The participant's own events, ``(kind, detail)`` such as ``("publish
    done", "devel: snapshot 42")``: written to the instance's history with
    this answer, before its "done" or "failed", and routed to the project's
    notification routes and subscribers like the engine's own (a kind is
    lower-case words: ``EVENT_KIND``)."""

    @staticmethod
    def done(fields: Mapping[str, Any] | None = None, *, ops: Sequence[Op] = (),
             events: Sequence[tuple[str, str]] = ()) -> "Reply":
        return Reply("done", dict(fields or {}), ops=tuple(ops), events=_events(events))

    @staticmethod
    def failed(error: str, *, ops: Sequence[Op] = (), events: Sequence[tuple[str, str]] = ()) -> "Reply":
        return Reply("failed", error=error or "failed", ops=tuple(ops), events=_events(events))

    @staticmethod
    def pending(*, ops: Sequence[Op] = (), events: Sequence[tuple[str, str]] = ()) -> "Reply":
        """Keep the workitem; ``ops`` and ``events`` are written with the step's
        "pending" (a question asked: its rows and messages, durable exactly
        when the step is known to wait)."""
        return Reply("pending", ops=tuple(ops), events=_events(events))


EVENT_KIND = re.compile(r"[a-z][a-z0-9]*(?: [a-z0-9]+){0,4}")
"""A participant's event kind: one to five lower-case words ("publish done")."""
ENGINE_KINDS = frozenset({"launched", "dispatched", "pending", "done", "error", "failed", "completed", "cancelled",
                          "terminated", "timed out", "retried", "skipped"})


def _events(events: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    for kind, detail in events:
        if not EVENT_KIND.fullmatch(kind) or kind in ENGINE_KINDS or kind.startswith("timer "):
            raise ValueError(f"event kind {kind!r}: expected one to five lower-case words, not one of the "
                             "engine's own (launched, completed, failed, ...)")
        if not isinstance(detail, str):
            raise ValueError(f"event {kind!r}: the detail is text")
    return tuple((k, d[:500]) for k, d in events)


# -- services: what a participant may use, and nothing more -----------------------------

class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (the engine's clock: manual in tests)."""


class DirectoryUser(Protocol):
    """A user from users.yaml, as a participant sees one."""

    @property
    def name(self) -> str: ...

    @property
    def emails(self) -> tuple[str, ...]: ...

    def roles_on(self, project: str | None) -> frozenset[str]:
        """Roles on ``project``, inherited from its parents (``Foo:Bar`` from ``Foo``) and ``"*"``."""

    def has_role(self, role: str, project: str | None = None) -> bool:
        """``role`` on ``project``, or admins there (who may do everything)."""


class UserDirectory(Protocol):
    """Who the users are (``bot.access.Directory`` is one)."""

    def user(self, name: str) -> DirectoryUser | None:
        """The user called ``name`` in users.yaml, if any."""

    def holders(self, role: str, project: str | None = None) -> Sequence[DirectoryUser]:
        """Users holding ``role`` on ``project`` (inherited from a parent project
        or ``"*"`` counts; being an admin does not), by name."""


class ReplyFn(Protocol):
    """``Engine.reply``: answer a dispatched or pending workitem later."""

    def __call__(self, key: str, reply: Reply, *, actor: str = "") -> Awaitable[None]: ...


StepParams = Callable[[Workitem], Awaitable[Mapping[str, Any]]]
Watch = Callable[[Callable[[Sequence["Event"]], Sequence["Op"]]], None]


@dataclass(frozen=True)
class Services:
    """Handed to ``Participant.setup`` once, before any workitem."""

    config: Any               # what check_config returned for the participant's section of bot.yaml
    clock: Clock
    users: UserDirectory
    reply: ReplyFn
    storage: Storage          # the participant's own tables (engine.participant_runtime.Storage)
    step_params: StepParams
    """The params of a workitem's step as written in the definition its
    instance runs, before rendering: to tell what the definition says from
    what came from fields (``participants/argsafety.py``)."""
    outbox: Any = None
    """The durable outbox (``notifiers.outbox.Outbox``): ``outbox.rows(...)``
    makes the ops that queue messages, to return in ``Reply.done(ops=...)`` or
    from a watcher, so they are written in the commit of what causes them.
    None in an engine built without one (tests, benchmarks)."""
    watch: Watch | None = None
    """``watch(hook)``: ``hook(events) -> ops`` runs inside every engine
    transition with its history events (``engine.events.Event``, each with
    its instance's project); the ops it returns (``storage.op``) are written
    in that transition's commit.  Fast and pure: no I/O, no await (keep an
    in-memory view loaded at setup).  E.g. a lock released, durably, exactly
    when its instance ends (events "completed", "failed", "cancelled",
    "terminated")."""
    open_keys: Callable[[], Awaitable[frozenset[str]]] | None = None
    """The dispatch keys of this participant's open workitems (dispatched,
    pending or being cancelled): what may still own leftovers on disk."""
    project_of: Callable[[int], Awaitable[str | None]] | None = None
    """The project an instance runs in (None: none)."""
    timers_of: Callable[[Workitem], Awaitable[list[tuple[str, float]]]] | None = None
    """A workitem's named step timers still to fire: (name, due), soonest first."""
    launched_by: Callable[[int], Awaitable[str | None]] | None = None
    """The actor recorded when an instance was launched: "<user> via
    <protocol>:<network>" for a command, "schedule <name>" for a schedule."""


class Participant:
    """Base class.  Subclasses set ``name`` and implement ``consume``."""

    name: ClassVar[str] = ""
    migrations: ClassVar[Sequence[str]] = ()
    """SQL scripts creating and changing the participant's own tables, all
    named ``<name>_...``: ``migrations[n]`` takes them from version n to n+1.
    Run by the store at start, before ``setup``; append, never edit a shipped one."""

    destination_params: ClassVar[tuple[str, ...]] = ()
    """Params that hold message destinations (``irc:<network>:#channel``,
    ``email:<address>``, ``user:<name>``; text or a list): the configuration
    check resolves those written literally against the configured networks
    and users (``notifiers.destinations``); templated ones are resolved when
    the step runs."""

    def check_config(self, section: Section) -> Any:
        """Check this participant's section of bot.yaml (empty when absent) and
        return what ``setup`` gets as ``services.config``.  Report problems with
        ``section.problem(key, message)`` (they stop the bot from starting and
        ``check`` prints them as ``file:line``), never raise.  The default
        takes no keys."""
        for key in list(section.node):
            section.problem(key, f"unknown key {key!r}: participant {self.name} takes no configuration")
        return None

    def check_params(self, params: Mapping[str, Any], config: Any) -> list[str]:
        """Problems with one step's params as written in its definition
        (templates not rendered), each a message; checked with the definitions.
        ``config`` is what ``check_config`` returned."""
        return []

    async def setup(self, services: Services) -> None:
        """Called once before any workitem."""

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
        done or failed Reply to answer the step, or ``Reply.pending(ops=...,
        events=...)`` to keep waiting and have what the timer did (a reminder's
        messages) written with the timer's end, in one commit."""
        return None

    async def cancel(self, workitem: Workitem) -> None:
        """The step was cancelled (instance cancelled, timeout, branch lost a race)."""


class DiscoveryError(ReleasebotError):
    """A participant could not be found or loaded (one line, naming it)."""


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

    def by_name(self) -> dict[str, Participant]:
        """name -> participant: what ``bot.config.load_config`` checks sections and steps with."""
        return dict(self._by_name)
