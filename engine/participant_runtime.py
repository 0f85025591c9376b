"""What the engine gives a participant at start: its configuration, its
services (``engine.participants.Services``) and its storage.

``Engine.start`` calls ``participant_services`` for each participant before
any workitem: it runs the participant's numbered migrations through the
store, then builds its ``Services``.

Storage: a participant's own tables, named ``<name>_...`` and created by its
``migrations``.  Every statement goes through the store: reads on the
store's reader connection (``query``), writes through its group-commit writer,
either alone (``write``: durable when it returns) or with the transition that
applies the participant's answer (``Reply.done(fields, ops=[...])``: durable
exactly when that answer is).  The table-name check is a guard against
mistakes, not a sandbox: participants are trusted code.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from engine.configkit import Findings, Section
from engine.definitions import ProcessSpec
from engine.errors import EngineError
from engine.participants import DirectoryUser, Participant, Services, UserDirectory, Workitem
from engine.store import Op, Store, split_statements

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger(__name__)

_NAME = r'["`\[]?([A-Za-z_][A-Za-z0-9_]*)'
_WRITES = re.compile(r"^\s*(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO|UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+"
                     + _NAME, re.IGNORECASE)
_SCHEMA = re.compile(r"^\s*(?:CREATE\s+(?:UNIQUE\s+)?(?:TEMP\s+|TEMPORARY\s+)?(?:TABLE|INDEX|VIEW|TRIGGER)"
                     r"(?:\s+IF\s+NOT\s+EXISTS)?|ALTER\s+TABLE|DROP\s+(?:TABLE|INDEX|VIEW|TRIGGER)"
                     r"(?:\s+IF\s+EXISTS)?)\s+" + _NAME, re.IGNORECASE)
_ON_TABLE = re.compile(r"\bON\s+" + _NAME, re.IGNORECASE)
_COMMENT = re.compile(r"^\s*(--[^\n]*\n\s*)*")


def table_prefix(owner: str) -> str:
    """The prefix of every table a participant owns: ``command`` -> ``command_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", owner) + "_"


class Storage:
    """A participant's own tables in the bot's database (module docstring)."""

    def __init__(self, store: Store, owner: str) -> None:
        self._store = store
        self.owner = owner
        self.prefix = table_prefix(owner)

    def op(self, sql: str, *params: Any) -> Op:
        """One statement on the participant's own tables (INSERT, REPLACE,
        UPDATE or DELETE on a table named ``<prefix>...``), for ``write`` or
        ``Reply.done(..., ops=[...])``."""
        self._check_write(sql)
        return (sql, tuple(params), False)

    def rows(self, sql: str, rows: Iterable[Sequence[Any]]) -> Op:
        """One statement run once per row (executemany)."""
        self._check_write(sql)
        return (sql, [tuple(r) for r in rows], True)

    async def write(self, *ops: Op) -> None:
        """Write ``ops`` in one commit of their own; durable when this returns.
        Raises ``engine.store.StoreError`` if it was not written."""
        if ops:
            await self._store.commit(list(ops))

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """A SELECT, on the store's reader connection (it sees every write
        that has returned)."""
        if not _COMMENT.sub("", sql).upper().startswith("SELECT"):
            raise ValueError(f"participant {self.owner}: query takes a SELECT, not {sql.split(None, 1)[0]!r}")
        return await self._store.read(lambda c: [tuple(r) for r in c.execute(sql, params)])

    async def queries(self, *statements: tuple[str, Sequence[Any]]) -> list[list[tuple[Any, ...]]]:
        """Several SELECTs ``(sql, params)`` in one trip to the reader (what one
        decision needs, read together)."""
        for sql, _params in statements:
            if not _COMMENT.sub("", sql).upper().startswith("SELECT"):
                raise ValueError(f"participant {self.owner}: queries take SELECTs, not {sql.split(None, 1)[0]!r}")
        return await self._store.read(lambda c: [[tuple(r) for r in c.execute(sql, tuple(params))]
                                                 for sql, params in statements])

    async def query_one(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        rows = await self.query(sql, *params)
        return rows[0] if rows else None

    def _check_write(self, sql: str) -> None:
        match = _WRITES.match(_COMMENT.sub("", sql))
        if match is None:
            raise ValueError(f"participant {self.owner}: expected INSERT, REPLACE, UPDATE or DELETE, got {sql!r}")
        self._own(match.group(1), sql)

    def _own(self, table: str, sql: str) -> None:
        if not table.startswith(self.prefix):
            raise ValueError(f"participant {self.owner} may write only its own tables (named {self.prefix}...), "
                             f"not {table!r}: {sql.strip()[:80]!r}")


def check_migrations(owner: str, migrations: Sequence[str]) -> None:
    """Every schema statement in ``migrations`` names the owner's tables only."""
    storage_prefix = table_prefix(owner)
    for number, script in enumerate(migrations, 1):
        for statement in split_statements(script):
            bare = _COMMENT.sub("", statement)
            schema = _SCHEMA.match(bare)
            names = [schema.group(1)] if schema else []
            if schema and re.match(r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX", bare, re.IGNORECASE):
                names += [m.group(1) for m in _ON_TABLE.finditer(bare)][:1]
            writes = _WRITES.match(bare)
            if writes:
                names.append(writes.group(1))
            if not names:
                raise EngineError(f"participant {owner}: migration {number}: expected CREATE, ALTER, DROP, "
                                  f"INSERT, UPDATE or DELETE, got {statement[:60]!r}")
            for name in names:
                if not name.startswith(storage_prefix):
                    raise EngineError(f"participant {owner}: migration {number} touches {name!r}; a participant's "
                                      f"tables are named {storage_prefix}...")


class NoUsers:
    """The user directory of an engine built without one (tests, benchmarks)."""

    def user(self, name: str) -> DirectoryUser | None:
        return None

    def holders(self, role: str, project: str | None = None) -> Sequence[DirectoryUser]:
        return []


@dataclass(frozen=True)
class ParticipantEnv:
    """What the app hands the engine for its participants."""

    config: Mapping[str, Any] = field(default_factory=dict)
    """name -> what the participant's ``check_config`` returned for its section
    of bot.yaml (``bot.config.BotConfig.participant_config``).  A participant
    missing here is checked against an empty section at start."""
    users: UserDirectory = field(default_factory=NoUsers)
    outbox: Any = None                  # the durable outbox (notifiers.outbox.Outbox), if the app has one


class StepSources:
    """A workitem's step params as written in the definition its instance
    runs (today's, or the stored version it was launched with)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def __call__(self, workitem: Workitem) -> Mapping[str, Any]:
        try:
            spec: ProcessSpec | None = await self._engine.definition_of(workitem.instance_id)
        except EngineError:
            spec = None
        # find(): a for_each body's steps are copies at their own paths (3.1.0), not in spec.steps
        step = spec.find(workitem.path) if spec is not None else None
        if step is None or step.participant != workitem.participant:
            raise LookupError(f"#{workitem.instance_id} {workitem.step}: the step's definition is not available")
        return dict(step.params or {})


def default_config(participant: Participant) -> Any:
    """What ``check_config`` makes of an empty section; its problems are raised."""
    findings = Findings(need_secrets=True)
    value = participant.check_config(Section(None, "bot.yaml", findings, label=f"participants {participant.name}"))
    if findings.problems:
        raise EngineError(f"participant {participant.name}: " + "; ".join(p.message for p in findings.problems))
    return value


async def participant_services(engine: Engine, participant: Participant, env: ParticipantEnv) -> Services:
    """Migrate ``participant``'s tables, then build what its ``setup`` gets."""
    if participant.migrations:
        check_migrations(participant.name, participant.migrations)
        await engine.store.migrate_participant(participant.name, participant.migrations)
    config = env.config[participant.name] if participant.name in env.config else default_config(participant)
    return Services(config=config, clock=engine.clock, users=env.users, reply=engine.reply,
                    storage=Storage(engine.store, participant.name), step_params=StepSources(engine),
                    outbox=env.outbox, watch=engine.watch,
                    open_keys=lambda: engine.open_keys(participant.name), launched_by=engine.launched_by,
                    project_of=engine.project_of, timers_of=engine.step_timers)
