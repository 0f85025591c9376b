"""All SQL: the schema, its numbered migrations, the group-commit writer and
the reads.  Blocking calls run off the event loop: writes in one writer
thread, reads in one reader thread, each with its own connection (WAL lets
them run side by side).

One bot per database: ``open`` takes an exclusive lock on ``<database>.lock``
and holds it until ``close`` (or the process dies: the kernel drops it, so a
killed bot never blocks its own restart).  Two bots on one database would run
every step and timer twice.

Group commit: commits queued while the disk is busy are written in one
transaction, and none is acknowledged before that COMMIT returns.  A lone
commit is written at once, never held back waiting for company.  Each commit
is atomic: all of it or none.  If the transaction fails, its commits are
written again one by one, each in its own savepoint, so one bad commit cannot
take the others down.  A commit may hold several transitions that stand or
fall together (they changed the same instance, whose row is written once for
all of them): it then fails whole, naming the transitions to blame.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from engine.errors import ReleasebotError
from engine.events import Event
from engine.participants import Workitem
from engine.timerops import ArmTimer, DropStepTimers, DropTimer, TimerKey, TimerOp

log = logging.getLogger(__name__)

Op = tuple[str, Sequence[Any], bool]   # (sql, params, executemany: then params is a sequence of rows)
T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: the engine's tables
    """
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        process TEXT NOT NULL,
        status TEXT NOT NULL,
        parent_id INTEGER,
        parent_path TEXT,
        project TEXT,
        fields TEXT NOT NULL,
        runs TEXT NOT NULL,
        serial INTEGER NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX instances_active ON instances(status) WHERE status IN ('running', 'waiting', 'failed');
    CREATE TABLE workitems (
        key TEXT PRIMARY KEY,
        instance_id INTEGER NOT NULL,
        process TEXT NOT NULL,
        path TEXT NOT NULL,
        step TEXT NOT NULL,
        participant TEXT NOT NULL,
        state TEXT NOT NULL,            -- dispatched | pending | cancelling
        params TEXT NOT NULL,
        fields TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX workitems_state ON workitems(state) WHERE state != 'pending';
    CREATE INDEX workitems_instance ON workitems(instance_id);
    CREATE TABLE timers (
        instance_id INTEGER NOT NULL,   -- 0 for schedules
        path TEXT NOT NULL,             -- step path, or the schedule's name
        kind TEXT NOT NULL,             -- timeout | wait | retry | event | schedule
        name TEXT NOT NULL,
        due REAL NOT NULL,
        fired INTEGER NOT NULL DEFAULT 0,   -- event timers: fired, not yet delivered
        PRIMARY KEY (instance_id, path, kind, name)
    ) WITHOUT ROWID;
    CREATE INDEX timers_due ON timers(fired, due);
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        instance_id INTEGER NOT NULL,
        at REAL NOT NULL,
        path TEXT NOT NULL,
        step TEXT NOT NULL,
        event TEXT NOT NULL,
        actor TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX history_instance ON history(instance_id, id);
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        last_run REAL
    );
    """,
    # 2: every version of every definition an instance ran on, so that editing
    # or removing a definition never strands the instances already running it
    """
    CREATE TABLE definitions (
        digest TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        first_seen REAL NOT NULL
    );
    ALTER TABLE instances ADD COLUMN definition TEXT;
    """,
    # 3: participants' own tables have numbered migrations too, counted per
    # participant (Store.migrate_participant)
    """
    CREATE TABLE participant_migrations (
        owner TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    """,
    # 4: the definition language each stored definition was written in (rows
    # stored before count as language 1, whose rules their instances keep);
    # the failure an instance's on_error dealt with (its "recovered" outcome);
    # launch idempotency tokens, kept 8 days
    """
    ALTER TABLE definitions ADD COLUMN language INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE instances ADD COLUMN handled TEXT NOT NULL DEFAULT '';
    CREATE TABLE launch_tokens (
        token TEXT PRIMARY KEY,
        instance_id INTEGER NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX launch_tokens_created ON launch_tokens(created);
    """,
]


@dataclass(frozen=True)
class InstanceRow:
    id: int
    process: str
    status: str
    parent_id: int | None
    parent_path: str | None
    project: str | None
    fields: dict[str, Any]
    runs: dict[str, Any]         # path -> a StepRun in its stored form (engine.runs)
    serial: int
    error: str
    created: float
    updated: float
    definition: str | None = None
    handled: str = ""            # the last failure an on_error dealt with ("step: message")


@dataclass(frozen=True)
class TimerRow:
    instance_id: int
    path: str
    kind: str
    name: str
    due: float
    fired: bool

    @property
    def key(self) -> TimerKey:
        return TimerKey(self.instance_id, self.path, self.kind, self.name)


@dataclass(frozen=True)
class WorkitemRow:
    key: str
    instance_id: int
    process: str
    path: str
    step: str
    participant: str
    state: str
    params: dict[str, Any]
    fields: dict[str, Any]
    created: float


@dataclass(frozen=True)
class HistoryRow:
    instance_id: int
    at: float
    path: str
    step: str
    event: str
    actor: str
    detail: str


class StoreError(ReleasebotError):
    """The database cannot be used (open refused) or a transition was not written.
    The message is one line, naming the database and the problem."""


class NotWritten(StoreError):
    """A commit was not written.  ``blamed``: the parts (transitions) whose own
    statements failed; the commit's other parts may be tried again.  Empty when
    no part is to blame (what they shared failed)."""

    def __init__(self, message: str, blamed: frozenset[int] = frozenset()) -> None:
        super().__init__(message)
        self.blamed = blamed


@dataclass(slots=True)
class _Commit:
    """One atomic unit in the writer's queue."""
    parts: Sequence[Sequence[Op]]     # each transition's own statements
    shared: Sequence[Op]              # what the parts wrote in common: written only with all of them
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


_dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode


def dumps(value: Any) -> str:
    return _dumps(value)


class Store:
    def __init__(self, path: Path | str, synchronous: str = "FULL") -> None:
        self.path = str(path)
        if synchronous.upper() not in ("FULL", "NORMAL", "OFF", "EXTRA"):
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.synchronous = synchronous.upper()
        self._queue: queue.SimpleQueue[list[_Commit] | None] = queue.SimpleQueue()
        self._outgoing: list[_Commit] = []
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._read_conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.commits = 0          # counters for benchmarks and tests
        self.transitions = 0

    # -- lifecycle ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def open(self) -> None:
        """Lock the database, create or migrate the schema, start the writer
        (blocking; call before serving).  Raises StoreError, one line, when the
        database cannot be used: nothing is left open then."""
        parent = Path(self.path).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"database {self.path}: cannot create the directory {parent}: "
                             f"{exc.strerror or exc}") from None
        self._lock()
        try:
            self._migrate()
        except BaseException:
            self._unlock()
            raise
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"database {self.path}: cannot open {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            by = f"another bot (pid {holder})" if holder.isdigit() else "another bot"
            raise StoreError(f"database {self.path} is in use by {by}; stop it first") from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"database {self.path}: cannot lock {lock_path}: {exc.strerror or exc}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)   # only for the message above
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)        # releases the lock; the file stays, harmless
            self._lock_fd = None

    def _migrate(self) -> None:
        try:
            conn = self._connect()
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise StoreError(f"database {self.path}: schema {version} is newer than this bot's "
                                     f"({len(MIGRATIONS)}); upgrade the bot")
                for number in range(version, len(MIGRATIONS)):
                    # one script, one transaction: a migration is applied whole or not at all
                    conn.executescript("BEGIN IMMEDIATE;" + MIGRATIONS[number]
                                       + f";PRAGMA user_version={number + 1};COMMIT;")
                    log.info("database %s migrated to schema %d", self.path, number + 1)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise StoreError(f"database {self.path}: not an SQLite database ({exc})") from None
            raise StoreError(f"database {self.path}: cannot open: {exc}") from None

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        self._reader.submit(self._close_reader).result()
        self._reader.shutdown()
        self._unlock()

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    # -- writing -----------------------------------------------------------------

    def commit(self, *parts: Sequence[Op], shared: Sequence[Op] = ()) -> asyncio.Future[None]:
        """Queue one atomic commit: one transition's statements (``commit(ops)``),
        or several transitions' (a ``part`` each) and the statements they
        share.  The future resolves once it is durable.

        Commits queued during one pass of the event loop go to the writer
        together at the end of that pass (``call_soon``): everything that
        became ready at once shares one fsync, and a lone commit waits for
        nothing but the current pass to finish."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(_Commit(parts, shared, future, loop))
        return future

    def _flush(self) -> None:
        batch, self._outgoing = self._outgoing, []
        self._queue.put(batch)

    def _write_loop(self) -> None:
        conn = self._connect()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = list(item)
                stop = False
                while len(batch) < 5000:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.extend(more)
                self._write_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _write_batch(self, conn: sqlite3.Connection, batch: list[_Commit]) -> None:
        try:
            self._write_fast(conn, batch)
            outcomes: list[BaseException | None] = [None] * len(batch)
        except sqlite3.Error:
            outcomes = self._write_isolated(conn, batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], BaseException | None]]] = {}
        for commit, outcome in zip(batch, outcomes):
            by_loop.setdefault(commit.loop, []).append((commit.future, outcome))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # loop closed: nobody waits any more
                pass

    def _write_fast(self, conn: sqlite3.Connection, batch: list[_Commit]) -> None:
        """The whole batch in one transaction.  Instance rows and history rows
        are only ever written by these two statements, so each is gathered
        into one executemany (relative order kept); every other statement runs
        in its transition's order."""
        instance_rows: list[Sequence[Any]] = []
        history_rows: list[Sequence[Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for commit in batch:
                for ops in (*commit.parts, commit.shared):
                    for sql, params, many in ops:
                        if sql is _INSTANCE_SQL:
                            instance_rows.extend(params)
                        elif sql is _HISTORY_SQL:
                            history_rows.extend(params)
                        elif many:
                            conn.executemany(sql, params)
                        else:
                            conn.execute(sql, params)
            if instance_rows:
                conn.executemany(_INSTANCE_SQL, instance_rows)
            if history_rows:
                conn.executemany(_HISTORY_SQL, history_rows)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("batch of %d commit(s) failed (%s); writing them one by one", len(batch), exc)
            conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self.transitions += sum(len(c.parts) for c in batch)

    def _write_isolated(self, conn: sqlite3.Connection, batch: list[_Commit]) -> list[BaseException | None]:
        """Slow path after a failed batch: each commit in its own savepoint,
        so one bad commit cannot take the others down."""
        outcomes: list[BaseException | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for commit in batch:
                outcomes.append(self._write_one(conn, commit))
            conn.execute("COMMIT")
            self.commits += 1
            self.transitions += sum(len(c.parts) for c, outcome in zip(batch, outcomes) if outcome is None)
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            log.error("commit of %d transition(s) failed: %s", len(batch), exc)
            outcomes = [StoreError(f"commit failed: {exc}")] * len(batch)
        return outcomes

    def _write_one(self, conn: sqlite3.Connection, commit: _Commit) -> NotWritten | None:
        """One commit in its own savepoint, each of its parts in a nested one
        (to know which part failed)."""
        conn.execute("SAVEPOINT one")
        blamed: list[int] = []
        failure: sqlite3.Error | None = None
        for index, ops in enumerate(commit.parts):
            conn.execute("SAVEPOINT part")
            try:
                _execute(conn, ops)
                conn.execute("RELEASE part")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK TO part")
                conn.execute("RELEASE part")
                blamed.append(index)
                failure = failure or exc
        if not blamed:
            try:
                _execute(conn, commit.shared)
                conn.execute("RELEASE one")
                return None
            except sqlite3.Error as exc:
                failure = exc
        conn.execute("ROLLBACK TO one")
        conn.execute("RELEASE one")
        log.error("transition not written: %s", failure)
        return NotWritten(f"transition not written: {failure}", frozenset(blamed))

    # -- participants' own tables ----------------------------------------------------

    async def migrate_participant(self, owner: str, migrations: Sequence[str]) -> int:
        """Bring ``owner``'s own tables (a participant's) up to date:
        ``migrations[n]`` (an SQL script) takes them from version n to n + 1,
        and ``participant_migrations`` remembers each owner's version.  The
        missing ones are written through the writer as one commit, with the
        new version, so they are applied whole or not at all.  Returns how
        many were applied.  Raises StoreError naming the owner."""
        def version(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT version FROM participant_migrations WHERE owner = ?", (owner,)).fetchone()
            return int(row[0]) if row else 0
        current = await self.read(version)
        if current > len(migrations):
            raise StoreError(f"database {self.path}: {owner}'s tables are at version {current}, newer than "
                             f"this bot's ({len(migrations)}); upgrade the bot")
        ops: list[Op] = []
        for number in range(current, len(migrations)):
            ops += [(sql, (), False) for sql in split_statements(migrations[number])]
            ops.append(("INSERT INTO participant_migrations (owner, version) VALUES (?, ?) "
                        "ON CONFLICT(owner) DO UPDATE SET version = excluded.version", (owner, number + 1), False))
        if ops:
            try:
                await self.commit(ops)
            except StoreError as exc:
                raise StoreError(f"database {self.path}: {owner}'s migrations {current + 1}-{len(migrations)} "
                                 f"failed: {exc}") from None
            log.info("database %s: %s's tables migrated to version %d", self.path, owner, len(migrations))
        return len(migrations) - current

    # -- reading -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._read_conn is None:
            self._read_conn = self._connect()
        return self._read_conn

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` run in the reader thread, on its connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, lambda: fn(self._conn()))

    async def max_instance_id(self) -> int:
        return await self.read(lambda c: int(c.execute("SELECT COALESCE(MAX(id), 0) FROM instances").fetchone()[0]))

    async def load_instances(self, ids: Iterable[int]) -> list[InstanceRow]:
        wanted = list(ids)

        def q(c: sqlite3.Connection) -> list[InstanceRow]:
            out = []
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                out += [_instance_row(r) for r in c.execute(
                    f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id IN ({marks})", chunk)]
            return out
        return await self.read(q)

    async def list_instances(self, include_finished: bool, limit: int = 200,
                             projects: Sequence[str] | None = None) -> list[InstanceRow]:
        """Newest first.  ``projects``: only instances without a project or in one
        of these projects or their sub-projects (None: every instance)."""
        where, args = _instance_filter(include_finished, projects)
        sql = f"SELECT {_INSTANCE_COLUMNS} FROM instances{where} ORDER BY id DESC LIMIT ?"
        return await self.read(lambda c: [_instance_row(r) for r in c.execute(sql, (*args, limit))])

    async def count_instances(self, include_finished: bool, projects: Sequence[str] | None = None) -> int:
        where, args = _instance_filter(include_finished, projects)
        sql = f"SELECT COUNT(*) FROM instances{where}"
        return await self.read(lambda c: int(c.execute(sql, args).fetchone()[0]))

    async def history(self, instance_id: int) -> list[HistoryRow]:
        sql = ("SELECT instance_id, at, path, step, event, actor, detail FROM history "
               "WHERE instance_id = ? ORDER BY id")
        return await self.read(lambda c: [HistoryRow(*r) for r in c.execute(sql, (instance_id,))])

    async def workitem_keys(self, participant: str) -> list[str]:
        """The keys of ``participant``'s open workitems (nothing else read)."""
        sql = "SELECT key FROM workitems WHERE participant = ?"
        return await self.read(lambda c: [str(r[0]) for r in c.execute(sql, (participant,))])

    async def launcher(self, instance_id: int) -> str | None:
        """The actor of an instance's "launched" entry (its first)."""
        sql = "SELECT actor FROM history WHERE instance_id = ? AND event = 'launched' AND path = '' ORDER BY id LIMIT 1"
        rows = await self.read(lambda c: c.execute(sql, (instance_id,)).fetchall())
        return str(rows[0][0]) if rows else None

    async def due_timers(self, now: float, limit: int = 5000) -> list[TimerRow]:
        sql = ("SELECT instance_id, path, kind, name, due, fired FROM timers "
               "WHERE fired = 0 AND due <= ? ORDER BY due LIMIT ?")
        return await self.read(lambda c: [TimerRow(*r) for r in c.execute(sql, (now, limit))])

    async def next_due(self) -> float | None:
        def q(c: sqlite3.Connection) -> float | None:
            due = c.execute("SELECT MIN(due) FROM timers WHERE fired = 0").fetchone()[0]
            return None if due is None else float(due)
        return await self.read(q)

    async def fired_timers(self) -> list[TimerRow]:
        sql = "SELECT instance_id, path, kind, name, due, fired FROM timers WHERE fired = 1"
        return await self.read(lambda c: [TimerRow(*r) for r in c.execute(sql)])

    async def timers_of(self, instance_id: int) -> list[TimerRow]:
        sql = ("SELECT instance_id, path, kind, name, due, fired FROM timers "
               "WHERE instance_id = ? ORDER BY due")
        return await self.read(lambda c: [TimerRow(*r) for r in c.execute(sql, (instance_id,))])

    async def schedule_timers(self) -> dict[str, float]:
        sql = "SELECT path, due FROM timers WHERE instance_id = 0 AND kind = 'schedule'"
        return await self.read(lambda c: {str(name): float(due) for name, due in c.execute(sql)})

    async def schedules(self) -> dict[str, tuple[str, float | None]]:
        return await self.read(lambda c: {n: (cron, last) for n, cron, last in
                                          c.execute("SELECT name, cron, last_run FROM schedules")})

    async def workitems(self, *, state: str | None = None, instance_id: int | None = None,
                        keys: Iterable[str] | None = None) -> list[WorkitemRow]:
        where: list[str] = []
        args: list[Any] = []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if instance_id is not None:
            where.append("instance_id = ?")
            args.append(instance_id)
        if keys is not None:
            klist = list(keys)
            if not klist:
                return []
            where.append(f"key IN ({','.join('?' * len(klist))})")
            args.extend(klist)
        sql = "SELECT * FROM workitems" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created"
        return await self.read(lambda c: [_workitem_row(r) for r in c.execute(sql, args)])

    # -- building transitions (pure: no I/O) -------------------------------------

    @staticmethod
    def instance_op(rows: Iterable[InstanceRow]) -> Op:
        """Insert or update instances; ``fields`` and ``runs`` are serialised now."""
        return (_INSTANCE_SQL, [(r.id, r.process, r.status, r.parent_id, r.parent_path, r.project, dumps(r.fields),
                                 dumps(r.runs), r.serial, r.error, r.created, r.updated, r.definition, r.handled)
                                for r in rows], True)

    @staticmethod
    def history_op(events: Iterable[Event]) -> Op:
        return (_HISTORY_SQL, [(e.instance_id, e.at, e.path, e.step, e.event, e.actor, e.detail) for e in events],
                True)

    @staticmethod
    def workitem_insert_op(workitems: Iterable[Workitem], created: float) -> Op:
        return ("INSERT OR REPLACE INTO workitems (key, instance_id, process, path, step, participant, state, "
                "params, fields, created) VALUES (?,?,?,?,?,?,'dispatched',?,?,?)",
                [(w.key, w.instance_id, w.process, w.path, w.step, w.participant, dumps(w.params), dumps(w.fields),
                  created) for w in workitems], True)

    @staticmethod
    def workitem_state_op(keys: list[str], state: str) -> Op:
        return ("UPDATE workitems SET state = ? WHERE key = ?", [(state, k) for k in keys], True)

    @staticmethod
    def workitem_delete_op(keys: list[str]) -> Op:
        return ("DELETE FROM workitems WHERE key = ?", [(k,) for k in keys], True)

    @staticmethod
    def timer_ops(ops: Iterable[TimerOp]) -> list[Op]:
        """A transition's timer changes as statements, in the order they happened."""
        out: list[Op] = []
        for op in ops:
            if isinstance(op, DropStepTimers):
                out.append(("DELETE FROM timers WHERE instance_id = ? AND path = ?", (op.instance_id, op.path),
                            False))
                continue
            key = (op.key.instance_id, op.key.path, op.key.kind, op.key.name)
            if isinstance(op, ArmTimer):
                out.append(("INSERT OR REPLACE INTO timers (instance_id, path, kind, name, due, fired) "
                            "VALUES (?,?,?,?,?,0)", (*key, op.due), False))
            elif isinstance(op, DropTimer):
                out.append(("DELETE FROM timers WHERE instance_id = ? AND path = ? AND kind = ? AND name = ?",
                            key, False))
            else:
                out.append(("UPDATE timers SET fired = 1 "
                            "WHERE instance_id = ? AND path = ? AND kind = ? AND name = ?", key, False))
        return out

    @staticmethod
    def schedule_ops(name: str, cron: str, last_run: float | None, next_due: float | None) -> list[Op]:
        ops: list[Op] = [("INSERT INTO schedules (name, cron, last_run) VALUES (?,?,?) ON CONFLICT(name) "
                          "DO UPDATE SET cron = excluded.cron, last_run = COALESCE(excluded.last_run, last_run)",
                          (name, cron, last_run), False)]
        if next_due is None:
            ops.append(("DELETE FROM timers WHERE instance_id = 0 AND kind = 'schedule' AND path = ?",
                        (name,), False))
        else:
            ops.append(("INSERT OR REPLACE INTO timers (instance_id, path, kind, name, due, fired) "
                        "VALUES (0, ?, 'schedule', '', ?, 0)", (name, next_due), False))
        return ops

    @staticmethod
    def definition_op(rows: list[tuple[str, str, str, float, int]]) -> Op:
        """Store definitions: (digest, name, source, first_seen, language)."""
        return ("INSERT OR IGNORE INTO definitions (digest, name, source, first_seen, language) VALUES (?,?,?,?,?)",
                rows, True)

    async def definition_source(self, digest: str) -> tuple[str, str] | None:
        def q(c: sqlite3.Connection) -> tuple[str, str] | None:
            row = c.execute("SELECT name, source FROM definitions WHERE digest = ?", (digest,)).fetchone()
            return None if row is None else (str(row[0]), str(row[1]))
        return await self.read(q)

    async def stored_definition(self, digest: str) -> tuple[str, str, int] | None:
        """A stored definition: its name, its YAML text and the definition language it was written in."""
        def q(c: sqlite3.Connection) -> tuple[str, str, int] | None:
            row = c.execute("SELECT name, source, language FROM definitions WHERE digest = ?", (digest,)).fetchone()
            return None if row is None else (str(row[0]), str(row[1]), int(row[2]))
        return await self.read(q)

    @staticmethod
    def launch_token_ops(token: str, instance_id: int, created: float, forget_before: float) -> list[Op]:
        """Remember a launch token with the instance it launched; forget tokens
        older than ``forget_before``.  A token already there fails the commit:
        a launch is written at most once per token."""
        return [("DELETE FROM launch_tokens WHERE created < ?", (forget_before,), False),
                ("INSERT INTO launch_tokens (token, instance_id, created) VALUES (?,?,?)",
                 (token, instance_id, created), False)]

    async def launch_token(self, token: str, since: float) -> int | None:
        """The instance a token launched, if it was used at or after ``since``."""
        def q(c: sqlite3.Connection) -> int | None:
            row = c.execute("SELECT instance_id FROM launch_tokens WHERE token = ? AND created >= ?",
                            (token, since)).fetchone()
            return None if row is None else int(row[0])
        return await self.read(q)

    @staticmethod
    def schedule_forget_op(name: str) -> list[Op]:
        return [("DELETE FROM schedules WHERE name = ?", (name,), False),
                ("DELETE FROM timers WHERE instance_id = 0 AND kind = 'schedule' AND path = ?", (name,), False)]


_INSTANCE_COLUMNS = ("id, process, status, parent_id, parent_path, project, fields, runs, serial, error, "
                     "created, updated, definition, handled")
_INSTANCE_SQL = ("INSERT INTO instances (id, process, status, parent_id, parent_path, project, fields, runs, "
                 "serial, error, created, updated, definition, handled) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                 "ON CONFLICT(id) DO UPDATE "
                 "SET status = excluded.status, fields = excluded.fields, runs = excluded.runs, "
                 "serial = excluded.serial, error = excluded.error, updated = excluded.updated, "
                 "handled = excluded.handled")
_HISTORY_SQL = ("INSERT INTO history (instance_id, at, path, step, event, actor, detail) "
                "VALUES (?,?,?,?,?,?,?)")


def split_statements(script: str) -> list[str]:
    """An SQL script's statements, one by one (the writer runs one per op)."""
    out: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                out.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;"):
        out.append(pending.strip())     # no final ';': incomplete, and SQLite will say so
    return out


def _execute(conn: sqlite3.Connection, ops: Sequence[Op]) -> None:
    for sql, params, many in ops:
        if many:
            conn.executemany(sql, params)
        else:
            conn.execute(sql, params)


def _resolve(results: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for future, outcome in results:
        if future.done():
            continue
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)


def _instance_filter(include_finished: bool, projects: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause (and its arguments) for listing instances."""
    clauses: list[str] = []
    args: list[str] = []
    if not include_finished:
        clauses.append("status IN ('running', 'waiting', 'failed')")
    if projects is not None:
        scope = ["project IS NULL"]
        for project in projects:
            # a project and its sub-projects: "Foo" and "Foo:..." (not "Foobar")
            scope.append("project = ? OR substr(project, 1, ?) = ?")
            args += [project, str(len(project) + 1), project + ":"]
        clauses.append("(" + " OR ".join(scope) + ")")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(args)


def _instance_row(r: tuple[Any, ...]) -> InstanceRow:
    return InstanceRow(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), json.loads(r[7]),
                       r[8], r[9], r[10], r[11], r[12], r[13])


def _workitem_row(r: tuple[Any, ...]) -> WorkitemRow:
    return WorkitemRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), json.loads(r[8]), r[9])
