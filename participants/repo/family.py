"""What the repository participants share: the configuration, the lock, the
snapshots, and the programs they run.

The six steps (``repo_lock``, ``repo_sync``, ``repo_verify``, ``repo_sign``,
``repo_publish``, ``repo_rollback``) are separate participants, as the
definitions name them, but they act on one state.  Discovery makes each with
``cls()``, so they meet at setup: ``family_for(services)`` gives the one
``RepoFamily`` of the engine whose services they were handed.  The state is
in SQLite, in ``repo_publish``'s tables (its migrations create them all):

* ``repo_publish_locks`` / ``repo_publish_queue``: the FIFO lock (``lock.py``);
* ``repo_publish_waits``: steps waiting for a freeze to end;
* ``repo_publish_snapshots``: every snapshot directory the bot made, written
  (as ``partial``) before rsync may create it, so a crash leaves nothing the
  bot does not know about;
* ``repo_publish_repos``: what ``current`` points at, and a swap under way;
* ``repo_publish_runs``: the process groups of programs running (``runner.py``).
"""
from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

from engine.errors import NoSuchWorkitem
from engine.events import Event
from engine.participant_runtime import Storage
from engine.participants import Reply, Services, Workitem
from engine.store import Op
from participants.repo import sign, verify
from participants.repo.config import Repository, RepoConfig
from participants.repo.freeze import frozen_until
from participants.repo.lock import Claim, Locks
from participants.repo.runner import ProgramFailed, Runner
from participants.repo.transfer import SyncStats, Transfer, parse_stats, staging_link

log = logging.getLogger(__name__)

MEMBERS = frozenset({"repo_lock", "repo_sync", "repo_verify", "repo_sign", "repo_publish", "repo_rollback"})
OWNER = "repo_publish"          # whose tables hold the state
ENDED = frozenset({"completed", "cancelled", "terminated"})
SNAPSHOTS = "repo_publish_snapshots"
REPOS = "repo_publish_repos"
WAITS = "repo_publish_waits"
_PROGRESS = re.compile(r"^\s*[\d,]+\s+\d+%")

MIGRATIONS = ("""
    CREATE TABLE repo_publish_locks (
        repo TEXT PRIMARY KEY,
        instance_id INTEGER NOT NULL,   -- the holder: released in the commit that ends it
        key TEXT NOT NULL,              -- its lock step (answered when the lock is handed to it)
        since REAL NOT NULL
    );
    CREATE TABLE repo_publish_queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        repo TEXT NOT NULL,
        instance_id INTEGER NOT NULL,
        key TEXT NOT NULL UNIQUE,       -- the waiting lock step (pending)
        since REAL NOT NULL
    );
    CREATE TABLE repo_publish_waits (
        key TEXT PRIMARY KEY,           -- a lock or publish step waiting for a freeze to end (pending)
        kind TEXT NOT NULL,             -- lock | publish
        repo TEXT NOT NULL,
        instance_id INTEGER NOT NULL,
        since REAL NOT NULL
    );
    CREATE TABLE repo_publish_snapshots (
        repo TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,              -- the sync step's dispatch key (the name is made from it)
        instance_id INTEGER NOT NULL,
        state TEXT NOT NULL,            -- partial | synced | current | retired | withdrawn
        previous TEXT,                  -- the snapshot it was linked against
        created REAL NOT NULL,
        published REAL,
        retired REAL,
        files INTEGER,
        bytes INTEGER,
        PRIMARY KEY (repo, name)
    );
    CREATE TABLE repo_publish_repos (
        repo TEXT PRIMARY KEY,
        current TEXT,                   -- the snapshot 'current' points at
        published REAL,
        instance_id INTEGER,            -- who published (or rolled back to) it
        swapping_to TEXT,               -- a swap under way (written before it, cleared after)
        swap_key TEXT
    );
    CREATE TABLE repo_publish_runs (
        tag TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        pgid INTEGER NOT NULL,
        boot TEXT NOT NULL,
        started REAL NOT NULL
    );
""",)


class StepFailed(Exception):
    """The step fails with this one-line message."""


@dataclass
class Waiting:
    kind: str               # lock | publish
    repo: str
    instance_id: int
    key: str
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class RepoStatus:
    """One repository, for the ``repos`` command."""

    name: str
    project: str
    destination: str
    current: str | None               # the published snapshot
    published: float | None           # when
    published_by: int | None          # the instance that published (or rolled back to) it
    state: str                        # idle | publishing #N | frozen until ... | ...
    holder: int | None                # instance holding the lock
    queue: tuple[int, ...]            # instances waiting for it, in order
    frozen_until: float | None
    freeze: str | None


_families: "weakref.WeakKeyDictionary[Any, RepoFamily]" = weakref.WeakKeyDictionary()


def family_for(services: Services) -> "RepoFamily":
    """The family of the engine these services come from (its ``reply``'s engine)."""
    engine = getattr(services.reply, "__self__", services.reply)
    family = _families.get(engine)
    if family is None:
        family = _families[engine] = RepoFamily()
    return family


def snapshot_name(key: str) -> str:
    """A snapshot directory's name, made from the sync step's dispatch key (12:3:1 -> 12-3-1)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key.replace(":", "-")).replace("..", "__")
    return name if name[:1].isalnum() else "s" + name


class RepoFamily:
    def __init__(self) -> None:
        self.services: dict[str, Services] = {}
        self.config = RepoConfig()
        self._storage: Storage | None = None
        self._locks: Locks | None = None
        self._runner: Runner | None = None
        self.waiting: dict[str, Waiting] = {}
        self.progress: dict[str, str] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.started = asyncio.Event()
        self.cleaned: asyncio.Future[None] | None = None      # the start-up cleanup (tests wait for it)

    # -- assembly --------------------------------------------------------------------

    @property
    def storage(self) -> Storage:
        assert self._storage is not None, "repository participants used before setup"
        return self._storage

    @property
    def locks(self) -> Locks:
        assert self._locks is not None, "repository participants used before setup"
        return self._locks

    @property
    def runner(self) -> Runner:
        assert self._runner is not None, "repository participants used before setup"
        return self._runner

    def now(self) -> float:
        return next(iter(self.services.values())).clock.now()

    async def attach(self, name: str, services: Services) -> None:
        self.services[name] = services
        if name == OWNER:
            if isinstance(services.config, RepoConfig):
                self.config = services.config
            self._storage = services.storage
        if MEMBERS <= set(self.services):
            await self._start()

    async def _start(self) -> None:
        self._locks = Locks(self.storage)
        await self.locks.load()
        self._runner = Runner(self.storage, self.config.timeout, self.config.kill_grace)
        await self.runner.setup()
        watch = self.services["repo_lock"].watch
        if watch is not None:
            watch(self.on_events)
        else:
            log.error("repository locks: this engine cannot watch transitions; a lock is not released "
                      "when its instance ends")
        for key, kind, repo, iid in await self.storage.query(f"SELECT key, kind, repo, instance_id FROM {WAITS}"):
            self.waiting[key] = Waiting(kind, repo, int(iid), key)
        self.started.set()
        self.cleaned = asyncio.ensure_future(self._recover())
        self.cleaned.add_done_callback(self._task_done)

    async def shutdown(self) -> None:
        for waiting in self.waiting.values():
            if waiting.task is not None:
                waiting.task.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.cleaned is not None and not self.cleaned.done():
            self.cleaned.cancel()
        if self._runner is not None:
            await self.runner.shutdown()

    async def idle(self) -> bool:
        """Wait for the tasks under way (lock grants); True if there were any (tests)."""
        busy = [t for t in self.tasks if not t.done()]
        if busy:
            await asyncio.wait(busy)
        return bool(busy)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("repository task failed", exc_info=task.exception())

    async def open_keys(self, member: str) -> frozenset[str]:
        fn = self.services[member].open_keys
        return await fn() if fn is not None else frozenset()

    # -- after a restart ---------------------------------------------------------------

    async def _recover(self) -> None:
        """Settle what a crash left: tell lock steps the lock they were handed,
        resume freeze waits, forget places in line and waits of steps that are
        gone, undo a swap whose step is gone, and remove partial snapshots
        whose sync step has no live workitem (only those)."""
        storage = self.storage
        lock_keys = await self.open_keys("repo_lock")
        for claim in self.locks.holders():
            if claim.key in lock_keys and claim.key not in self.waiting:
                self.spawn(self._grant(claim))
        ops = [op for c in list(self.locks.queue_claims()) if c.key not in lock_keys for op in self.locks.leave(c.key)]
        publish_keys = await self.open_keys("repo_publish")
        for key, waiting in list(self.waiting.items()):
            if key in (lock_keys if waiting.kind == "lock" else publish_keys):
                self._arm(waiting)
            else:
                del self.waiting[key]
                ops.append(storage.op(f"DELETE FROM {WAITS} WHERE key = ?", key))
        if ops:
            await storage.write(*ops)
        swap_keys = publish_keys | await self.open_keys("repo_rollback")
        for repo_name, current, swapping_to, swap_key in await storage.query(
                f"SELECT repo, current, swapping_to, swap_key FROM {REPOS} WHERE swapping_to IS NOT NULL"):
            if swap_key in swap_keys or repo_name not in self.config.repositories:
                continue
            log.warning("%s: a swap to %s was cut off and its step is gone; putting back %s",
                        repo_name, swapping_to, current)
            try:
                if current:
                    await self.swap(self.config.repositories[repo_name], current, f"recover:{repo_name}")
                await storage.write(storage.op(f"UPDATE {REPOS} SET swapping_to = NULL, swap_key = NULL "
                                               "WHERE repo = ?", repo_name))
            except (ProgramFailed, OSError, ValueError) as exc:
                log.error("%s: could not put back %s: %s", repo_name, current, exc)
        sync_keys = await self.open_keys("repo_sync")
        partial: dict[str, list[str]] = {}
        for repo_name, name, key in await storage.query(
                f"SELECT repo, name, key FROM {SNAPSHOTS} WHERE state = 'partial'"):
            if key not in sync_keys and repo_name in self.config.repositories:
                partial.setdefault(repo_name, []).append(name)
        for repo_name, names in partial.items():
            try:
                await self.remove(self.config.repositories[repo_name], names, f"cleanup:{repo_name}")
            except (ProgramFailed, OSError, ValueError) as exc:
                log.error("%s: could not remove partial snapshots %s: %s", repo_name, ", ".join(names), exc)
                continue
            log.info("%s: removed partial snapshot(s) %s left by a sync that is gone", repo_name, ", ".join(names))
            await storage.write(storage.rows(f"DELETE FROM {SNAPSHOTS} WHERE repo = ? AND name = ?",
                                             [(repo_name, n) for n in names]))

    async def discard_partial(self, key: str) -> None:
        """A sync step was cancelled: its partial snapshot will never be finished."""
        row = await self.storage.query_one(f"SELECT repo, name FROM {SNAPSHOTS} WHERE key = ? AND state = 'partial'",
                                           key)
        if row is None or row[0] not in self.config.repositories:
            return
        try:
            await self.remove(self.config.repositories[row[0]], [row[1]], key)
        except (ProgramFailed, OSError, ValueError) as exc:
            log.warning("%s: could not remove the partial snapshot %s of a cancelled sync (the next start "
                        "tries again): %s", row[0], row[1], exc)
            return
        log.info("%s: removed partial snapshot(s) %s of a cancelled sync", row[0], row[1])
        await self.storage.write(self.storage.op(f"DELETE FROM {SNAPSHOTS} WHERE repo = ? AND name = ?",
                                                 row[0], row[1]))

    # -- the lock ----------------------------------------------------------------------

    def on_events(self, events: Sequence[Event]) -> Sequence[Op]:
        """Inside every transition: instances that ended give up their lock,
        their place in line and their freeze waits, in the same commit."""
        ended = {e.instance_id for e in events
                 if (e.event in ENDED and not e.path) or e.event == "failed"}
        if not ended or self._locks is None:
            return []
        ops, granted = self.locks.release(ended)
        for key, waiting in list(self.waiting.items()):
            if waiting.instance_id in ended:
                if waiting.task is not None:
                    waiting.task.cancel()
                del self.waiting[key]
                ops.append(self.storage.op(f"DELETE FROM {WAITS} WHERE key = ?", key))
        for claim in granted:
            if claim.key not in self.waiting:
                self.spawn(self._grant(claim))
        return ops

    async def _grant(self, claim: Claim) -> None:
        """Tell a waiting lock step that the lock is its own now (after the commit that made it so)."""
        await asyncio.sleep(0)
        try:
            await self.services["repo_lock"].reply(claim.key, Reply.done(self.lock_fields(claim.repo)),
                                                   actor="repo_lock")
        except NoSuchWorkitem:
            pass

    def lock_fields(self, repo_name: str) -> dict[str, Any]:
        repo = self.config.repositories.get(repo_name)
        # who approves a publish (repo-publish's ask step): the repository's approval roles,
        # release-managers when it names none
        roles = (repo.approvers or ("release-managers",)) if repo else ()
        return {"locked": repo_name, "approval": bool(repo and repo.approval),
                "approvers": [f"role:{r}" for r in roles]}

    def ensure_lock(self, repo: Repository, wi: Workitem) -> list[Op]:
        """A step that needs the lock: held by its instance, or taken now if free
        (an instance retried after it failed lost its lock).  The ops to write."""
        if self.locks.holds(repo.name, wi.instance_id):
            return []
        ops = self.locks.take(Claim(repo.name, wi.instance_id, wi.key, self.now()))
        if ops is None:
            holder = self.locks.holder(repo.name)
            who = f"#{holder.instance_id}" if holder else "the next in line"
            raise StepFailed(f"repository {repo.name} is locked by {who}, and this instance does not hold "
                             "the lock (it was released when the instance failed): retry when it is free")
        return ops

    async def take_lock(self, wi: Workitem, repo: Repository, wait: bool) -> Reply:
        """The lock step, once no freeze holds it back."""
        if self.locks.holds(repo.name, wi.instance_id):
            return Reply.done(self.lock_fields(repo.name))
        claim = Claim(repo.name, wi.instance_id, wi.key, self.now())
        ops = self.locks.take(claim)
        if ops is not None:
            await self.storage.write(*ops)
            return Reply.done(self.lock_fields(repo.name))
        holder = self.locks.holder(repo.name)
        if not wait:
            who = f"#{holder.instance_id}" if holder else "an instance about to get it"
            return Reply.failed(f"repository {repo.name} is locked by {who}")
        position, ops = self.locks.enqueue(claim)
        await self.storage.write(*ops)
        log.info("#%d: waiting for the lock on %s (position %d, held by #%s)", wi.instance_id, repo.name, position,
                 holder.instance_id if holder else "-")
        self.progress[wi.key] = f"waiting for the lock on {repo.name}: #{holder.instance_id if holder else '-'} " \
                                f"holds it; position {position}"
        return Reply.pending()

    def cancel_key(self, key: str) -> list[Op]:
        """A step was cancelled: out of the line, and no longer waiting."""
        ops = self.locks.leave(key)
        waiting = self.waiting.pop(key, None)
        if waiting is not None:
            if waiting.task is not None:
                waiting.task.cancel()
            ops.append(self.storage.op(f"DELETE FROM {WAITS} WHERE key = ?", key))
        self.progress.pop(key, None)
        return ops

    # -- freezes -----------------------------------------------------------------------

    async def forced(self, wi: Workitem, repo: Repository, force: Any) -> bool:
        """Is this publish forced through a freeze?  Only by someone holding the
        override role on the repository's project; StepFailed for anyone else."""
        if force in (None, False, "", "false", "no", "0", 0):
            return False
        launched = self.services["repo_lock"].launched_by
        actor = (await launched(wi.instance_id) if launched is not None else None) or ""
        name = actor.split(" via ", 1)[0]
        user = self.services["repo_lock"].users.user(name) if not actor.startswith("schedule ") else None
        role = self.config.override_role
        if user is None or not user.has_role(role, repo.project):
            raise StepFailed(f"force refused: {actor or 'the launcher'} does not hold the {role} role on "
                             f"{repo.project}")
        return True

    def frozen(self, repo: Repository) -> tuple[float, str] | None:
        found = frozen_until(repo.freezes, self.now())
        return (found[0], found[1].name) if found else None

    async def wait_freeze(self, kind: str, wi: Workitem, repo: Repository, until: tuple[float, str]) -> Reply:
        waiting = Waiting(kind, repo.name, wi.instance_id, wi.key)
        self.waiting[wi.key] = waiting
        await self.storage.write(self.storage.op(
            f"INSERT OR REPLACE INTO {WAITS} (key, kind, repo, instance_id, since) VALUES (?, ?, ?, ?, ?)",
            wi.key, kind, repo.name, wi.instance_id, self.now()))
        log.info("#%d %s: %s is frozen (%s) until %s; waiting", wi.instance_id, wi.step, repo.name, until[1],
                 _iso(until[0]))
        self._arm(waiting)
        return Reply.pending()

    def _arm(self, waiting: Waiting) -> None:
        waiting.task = asyncio.ensure_future(self._await_thaw(waiting))

    async def _await_thaw(self, waiting: Waiting) -> None:
        repo = self.config.repositories.get(waiting.repo)
        if repo is None:
            return
        while True:
            until = self.frozen(repo)
            if until is None:
                break
            self.progress[waiting.key] = f"{repo.name} is frozen ({until[1]}) until {_iso(until[0])}"
            await asyncio.sleep(max(0.0, min(until[0] - self.now(), self.config.freeze_recheck)) or 0.01)
        if self.waiting.get(waiting.key) is not waiting:
            return
        del self.waiting[waiting.key]
        self.progress.pop(waiting.key, None)
        await self.storage.write(self.storage.op(f"DELETE FROM {WAITS} WHERE key = ?", waiting.key))
        wi = Workitem(waiting.key, waiting.instance_id, "", "", "", waiting.kind, {}, {})
        member = "repo_lock" if waiting.kind == "lock" else "repo_publish"
        try:
            if waiting.kind == "lock":
                reply = await self.take_lock(wi, repo, wait=True)
            else:
                reply = await self.publish_now(wi, repo)
        except StepFailed as exc:
            reply = Reply.failed(str(exc))
        if reply.kind != "pending":
            try:
                await self.services[member].reply(waiting.key, reply, actor=f"{member} (freeze ended)")
            except NoSuchWorkitem:
                pass

    # -- snapshots ---------------------------------------------------------------------

    async def current(self, repo: str) -> str | None:
        row = await self.storage.query_one(f"SELECT current FROM {REPOS} WHERE repo = ?", repo)
        return str(row[0]) if row and row[0] else None

    async def synced_snapshot(self, repo: Repository, wi: Workitem) -> str:
        row = await self.storage.query_one(
            f"SELECT name FROM {SNAPSHOTS} WHERE repo = ? AND instance_id = ? AND state IN ('synced', 'current') "
            "ORDER BY created DESC, rowid DESC LIMIT 1", repo.name, wi.instance_id)
        if row is None:
            raise StepFailed(f"#{wi.instance_id} has no synced snapshot of {repo.name} (run the sync step first)")
        return str(row[0])

    def on_rsync_line(self, key: str, what: str) -> Callable[[str], None]:
        def note(line: str) -> None:
            if _PROGRESS.match(line):
                self.progress[key] = f"{what}: {' '.join(line.split())}"
        return note

    async def sync(self, wi: Workitem, repo: Repository) -> Reply:
        ops = self.ensure_lock(repo, wi)
        storage = self.storage
        row = await storage.query_one(f"SELECT name, state, previous FROM {SNAPSHOTS} WHERE key = ?", wi.key)
        if row is not None and row[1] != "partial":
            return Reply.done(await self._sync_fields(repo, str(row[0])))
        name = str(row[0]) if row else snapshot_name(wi.key)
        previous = (str(row[2]) if row[2] else None) if row else await self.current(repo.name)
        if row is None:        # recorded before rsync may create the directory
            ops.append(storage.op(
                f"INSERT INTO {SNAPSHOTS} (repo, name, key, instance_id, state, previous, created) "
                "VALUES (?, ?, ?, ?, 'partial', ?, ?)", repo.name, name, wi.key, wi.instance_id, previous,
                self.now()))
        transfer = Transfer(repo)
        total = SyncStats()
        passes = transfer.sync_argvs(name, previous)
        for number, argv in enumerate(passes, 1):
            what = f"sync {number}/{len(passes)} ({'packages' if number == 1 else 'metadata'})"
            self.progress[wi.key] = what
            # the snapshot's row (and the lock, if retaken) go in the commit recording the first run
            result = await self.runner.run(wi.key, argv, env=transfer.env(), on_line=self.on_rsync_line(wi.key, what),
                                           with_ops=ops if number == 1 else ())
            stats = parse_stats(result.stdout)
            total.add(stats)
        self.progress.pop(wi.key, None)
        prev_files = 0
        if previous:
            got = await storage.query_one(f"SELECT files FROM {SNAPSHOTS} WHERE repo = ? AND name = ?",
                                          repo.name, previous)
            prev_files = int(got[0] or 0) if got else 0
        changed = max(0, total.transferred - total.created)
        deleted = max(0, prev_files - (total.files - total.created)) if previous else 0
        fields = {"snapshot": name, "previous": previous, "added": total.created, "changed": changed,
                  "deleted": deleted, "bytes": total.bytes}
        log.info("#%d %s: %s synced into %s: %d added, %d changed, %d deleted, %d bytes", wi.instance_id, wi.step,
                 repo.name, name, total.created, changed, deleted, total.bytes)
        return Reply.done(fields, ops=[storage.op(
            f"UPDATE {SNAPSHOTS} SET state = 'synced', files = ?, bytes = ? WHERE repo = ? AND name = ?",
            total.files, total.bytes, repo.name, name)])

    async def _sync_fields(self, repo: Repository, name: str) -> dict[str, Any]:
        row = await self.storage.query_one(f"SELECT previous, bytes FROM {SNAPSHOTS} WHERE repo = ? AND name = ?",
                                           repo.name, name)
        return {"snapshot": name, "previous": row[0] if row else None, "bytes": int(row[1] or 0) if row else 0}

    async def _metadata_copy(self, repo: Repository, name: str, key: str, paths: Sequence[str],
                             into: Path) -> Path:
        """Where the snapshot's files can be read: the snapshot itself (local), or
        ``into`` after fetching ``paths`` from the destination."""
        transfer = Transfer(repo)
        if transfer.local:
            return transfer.snapshot_path(name)
        missing = [p for p in paths if not (into / p).exists()]
        if missing:
            into.mkdir(parents=True, exist_ok=True)
            result = await self.runner.run(key, transfer.fetch_argv(name, missing, into), env=transfer.env(),
                                           check=False)
            if result.code not in (0, 23):      # 23: some files are missing there (verify says which)
                tail = " | ".join(line.strip() for line in result.stderr[-3:])
                raise ProgramFailed(f"fetching the metadata of {repo.name} snapshot {name}: rsync exited with "
                                    f"status {result.code}: {tail}")
        return into

    async def verify(self, wi: Workitem, repo: Repository) -> Reply:
        ops = self.ensure_lock(repo, wi)
        if ops:
            await self.storage.write(*ops)
        if not repo.verify:
            return Reply.done({"verified": 0})
        name = await self.synced_snapshot(repo, wi)
        with tempfile.TemporaryDirectory(prefix="repo-verify-") as tmp:
            # the metadata directories come back in one transfer: what repomd.xml lists is there too
            root = await self._metadata_copy(repo, name, wi.key, [*repo.metadata, *repo.verify], Path(tmp) / "tree")
            entries: list[verify.Listed] = []
            for expected in repo.verify:
                if expected.endswith("repomd.xml") and (root / expected).is_file():
                    try:
                        found = verify.listed((root / expected).read_bytes())
                    except ValueError as exc:
                        return Reply.failed(f"{repo.name} snapshot {name}: {exc}")
                    base = expected.rpartition("/")[0]
                    prefix = base.rpartition("/")[0] if base else ""    # hrefs are relative to the repo root
                    entries += [verify.Listed(f"{prefix}/{e.href}" if prefix else e.href, e.algorithm, e.digest)
                                for e in found]
            root = await self._metadata_copy(repo, name, wi.key, [e.href for e in entries], root) \
                if not Transfer(repo).local else root
            problems = verify.check(root, repo.verify, entries)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            return Reply.failed(f"{repo.name} snapshot {name} does not verify: {'; '.join(problems[:3])}{more}")
        return Reply.done({"verified": len(repo.verify) + len(entries)})

    async def sign(self, wi: Workitem, repo: Repository) -> Reply:
        ops = self.ensure_lock(repo, wi)
        if ops:
            await self.storage.write(*ops)
        if repo.signing is None:
            return Reply.done({"signed": False})
        name = await self.synced_snapshot(repo, wi)
        target = next((p for p in repo.verify if p.endswith("repomd.xml")), "repodata/repomd.xml")
        transfer = Transfer(repo)
        with tempfile.TemporaryDirectory(prefix="repo-sign-") as tmp:
            root = await self._metadata_copy(repo, name, wi.key, [target], Path(tmp) / "tree")
            file = root / target
            if not file.is_file():
                return Reply.failed(f"{repo.name} snapshot {name}: {target} is missing; nothing to sign")
            try:
                await self.runner.run(wi.key, sign.sign_argv(repo.signing, file))
            except ProgramFailed as exc:
                return Reply.failed(f"signing {target} of {repo.name}: {exc}")
            if not transfer.local:
                await self.runner.run(wi.key, transfer.push_argv(name, Path(str(file) + ".asc"),
                                                                 target.rpartition("/")[0]), env=transfer.env())
        return Reply.done({"signed": True, "signature": target + ".asc"})

    # -- the swap ----------------------------------------------------------------------

    async def swap(self, repo: Repository, name: str, key: str) -> None:
        transfer = Transfer(repo)
        if transfer.local:
            transfer.swap_local(name)
            return
        with staging_link(name) as tmp:
            await self.runner.run(key, transfer.swap_argv(Path(tmp)), env=transfer.env())

    async def remove(self, repo: Repository, names: Sequence[str], key: str) -> None:
        if not names:
            return
        transfer = Transfer(repo)
        if transfer.local:
            await asyncio.to_thread(transfer.remove_local, names)
            return
        with tempfile.TemporaryDirectory(prefix="repo-empty-") as empty:
            await self.runner.run(key, transfer.remove_argv(names, Path(empty)), env=transfer.env())

    async def publish(self, wi: Workitem, repo: Repository, force: Any) -> Reply:
        ops = self.ensure_lock(repo, wi)
        if ops:
            await self.storage.write(*ops)
        if not await self.forced(wi, repo, force):
            until = self.frozen(repo)
            if until is not None:
                return await self.wait_freeze("publish", wi, repo, until)
        return await self.publish_now(wi, repo)

    async def publish_now(self, wi: Workitem, repo: Repository) -> Reply:
        name = await self.synced_snapshot(repo, wi)
        ops = await self._switch(wi, repo, name)
        now = self.now()
        pruned, prune_ops = await self._prune(repo, name, wi.key, now)
        storage = self.storage
        ops += [storage.op(f"UPDATE {SNAPSHOTS} SET state = 'retired', retired = ? WHERE repo = ? AND "
                           "state = 'current' AND name != ?", now, repo.name, name),
                storage.op(f"UPDATE {SNAPSHOTS} SET state = 'current', published = ?, retired = NULL "
                           "WHERE repo = ? AND name = ?", now, repo.name, name),
                *prune_ops]
        log.info("#%d: %s published: current -> snapshots/%s%s", wi.instance_id, repo.name, name,
                 f"; pruned {', '.join(pruned)}" if pruned else "")
        return Reply.done({"published": name, "pruned": pruned}, ops=ops)

    async def _switch(self, wi: Workitem, repo: Repository, name: str) -> list[Op]:
        """Swap ``current`` to ``name``: the intent is written first, so a crash
        mid-swap is settled at start; the ops record the result with the answer."""
        storage = self.storage
        await storage.write(storage.op(
            f"INSERT INTO {REPOS} (repo, swapping_to, swap_key) VALUES (?, ?, ?) ON CONFLICT(repo) DO UPDATE "
            "SET swapping_to = excluded.swapping_to, swap_key = excluded.swap_key", repo.name, name, wi.key))
        self.progress[wi.key] = f"swapping current to snapshots/{name}"
        try:
            await self.swap(repo, name, wi.key)
        except (OSError, ValueError) as exc:
            raise StepFailed(f"swapping {repo.name} to {name}: {exc}") from None
        finally:
            self.progress.pop(wi.key, None)
        return [storage.op(f"UPDATE {REPOS} SET current = ?, published = ?, instance_id = ?, swapping_to = NULL, "
                           "swap_key = NULL WHERE repo = ?", name, self.now(), wi.instance_id, repo.name)]

    async def _prune(self, repo: Repository, keep: str, key: str, now: float) -> tuple[list[str], list[Op]]:
        """Snapshots beyond retention, never one retired less than the grace
        period ago; never a sync under way.  Removed now; their rows go with the answer."""
        rows = await self.storage.query(
            f"SELECT name, state, published, retired, created, key FROM {SNAPSHOTS} WHERE repo = ? "
            "ORDER BY COALESCE(published, 0) DESC, rowid DESC", repo.name)
        sync_keys = await self.open_keys("repo_sync")
        published = [r for r in rows if r[0] == keep] + [r for r in rows if r[0] != keep and r[2] is not None]
        kept = {r[0] for r in published[:repo.retention]}
        doomed = []
        for name, state, _published, retired, created, skey in rows:
            if name == keep or name in kept or state in ("current",):
                continue
            if state == "partial" or (state == "synced" and skey in sync_keys):
                continue
            since = retired if retired is not None else created
            if since + repo.grace <= now:
                doomed.append(name)
        if not doomed:
            return [], []
        try:
            await self.remove(repo, doomed, key)
        except (ProgramFailed, OSError, ValueError) as exc:
            log.warning("%s: pruning %s failed (kept for the next publish): %s", repo.name, ", ".join(doomed), exc)
            return [], []
        return doomed, [self.storage.rows(f"DELETE FROM {SNAPSHOTS} WHERE repo = ? AND name = ?",
                                          [(repo.name, n) for n in doomed])]

    async def rollback(self, wi: Workitem, repo: Repository) -> Reply:
        ops = self.ensure_lock(repo, wi)
        if ops:
            await self.storage.write(*ops)
        current = await self.current(repo.name)
        row = await self.storage.query_one(
            f"SELECT name FROM {SNAPSHOTS} WHERE repo = ? AND state = 'retired' AND name != ? "
            "ORDER BY published DESC, rowid DESC LIMIT 1", repo.name, current or "")
        if row is None:
            return Reply.failed(f"{repo.name}: no earlier snapshot to roll back to (retention keeps "
                                f"{repo.retention})")
        target = str(row[0])
        ops = await self._switch(wi, repo, target)
        now = self.now()
        storage = self.storage
        ops += [storage.op(f"UPDATE {SNAPSHOTS} SET state = 'withdrawn', retired = ? WHERE repo = ? AND name = ?",
                           now, repo.name, current or ""),
                storage.op(f"UPDATE {SNAPSHOTS} SET state = 'current', retired = NULL WHERE repo = ? AND name = ?",
                           repo.name, target)]
        log.info("#%d: %s rolled back: current -> snapshots/%s (was %s)", wi.instance_id, repo.name, target, current)
        return Reply.done({"rolled_back_to": target, "withdrawn": current}, ops=ops)

    # -- what the chat commands show -----------------------------------------------------

    async def status(self) -> list[RepoStatus]:
        rows = {r[0]: r for r in await self.storage.query(
            f"SELECT repo, current, published, instance_id FROM {REPOS}")}
        found = []
        for name, repo in sorted(self.config.repositories.items()):
            row = rows.get(name)
            holder = self.locks.holder(name) if self._locks else None
            queue = tuple(c.instance_id for c in self.locks.queue(name)) if self._locks else ()
            until = self.frozen(repo)
            waits = sorted(w.instance_id for w in self.waiting.values() if w.repo == name)
            if holder is not None:
                state = f"publishing (#{holder.instance_id})"
            elif waits:
                state = "waiting for the freeze to end (" + ", ".join(f"#{i}" for i in waits) + ")"
            else:
                state = "idle"
            if until is not None:
                state += f"; frozen ({until[1]}) until {_iso(until[0])}"
            found.append(RepoStatus(name, repo.project, repo.destination.shown(),
                                    row[1] if row else None, row[2] if row else None, row[3] if row else None,
                                    state, holder.instance_id if holder else None, queue,
                                    until[0] if until else None, until[1] if until else None))
        return found


def _iso(ts: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def params_repo(config: RepoConfig, params: Mapping[str, Any]) -> Repository:
    try:
        return config.repository(params.get("repo"))
    except ValueError as exc:
        raise StepFailed(f"not run: {exc}") from None


__all__ = ["MEMBERS", "MIGRATIONS", "RepoFamily", "RepoStatus", "StepFailed", "family_for", "params_repo", "snapshot_name"]
